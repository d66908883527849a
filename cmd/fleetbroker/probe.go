package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
)

// probeUnhealthy is the exit status of a failed probe. Docker's HEALTHCHECK
// documents 1 as "unhealthy" and reserves 2, which main uses for usage
// errors; Kubernetes treats any non-zero status as a failure.
const probeUnhealthy = 1

// probeConfig is what `fleetbroker probe` checks and how it connects.
type probeConfig struct {
	addr       string
	service    string
	timeout    time.Duration
	caFile     string
	certFile   string
	keyFile    string
	serverName string
	insecure   bool
	alive      bool
}

// probeFlags declares the flags of `fleetbroker probe`.
//
// The probe usually runs inside the server's own container (a Docker
// HEALTHCHECK or a Kubernetes exec probe), so it inherits that container's
// environment. Its flag names are chosen so that inheriting is harmless or
// right: FLEETBROKER_INSECURE means plaintext to both, and FLEETBROKER_TLS_CERT
// and FLEETBROKER_TLS_KEY, the server's own certificate, are what the probe
// presents when the server requires client certificates.
func probeFlags() (*flag.FlagSet, *probeConfig) {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	cfg := &probeConfig{}
	fs.StringVar(&cfg.addr, "addr", "localhost:7401", "gRPC address of the server to check")
	fs.StringVar(&cfg.service, "service", "", "service name to check (default: the whole server)")
	fs.DurationVar(&cfg.timeout, "timeout", 2*time.Second, "give up after this long (connecting included)")
	fs.StringVar(&cfg.caFile, "tls-ca", "", "CA bundle that signed the server's certificate (default: the system roots)")
	fs.StringVar(&cfg.certFile, "tls-cert", "", "client certificate (PEM), for servers that require one (mTLS)")
	fs.StringVar(&cfg.keyFile, "tls-key", "", "client private key (PEM)")
	fs.StringVar(&cfg.serverName, "tls-server-name", "", "name to verify in the server's certificate (default: the host of --addr)")
	fs.BoolVar(&cfg.insecure, "insecure", false, "connect in plaintext (servers run with --insecure)")
	fs.BoolVar(&cfg.alive, "alive", false, "succeed on any health answer, NOT_SERVING included: the server is alive even while a dependency is down (liveness probes)")
	return fs, cfg
}

// runProbe is `fleetbroker probe`: one grpc.health.v1.Health/Check, for
// container health checks in images without a shell or grpcurl. It exits 0
// when the answer is SERVING (with --alive: when there is an answer at all);
// otherwise it prints one line saying why to stderr and exits with
// probeUnhealthy itself, since main would exit 2.
//
// The two modes are readiness and liveness. A server reports NOT_SERVING
// while Redis or Vault is unreachable and while it drains: take it out of
// the load balancer (readiness), but do not restart it (liveness, --alive),
// which would not bring Redis back and would restart every replica at once.
// --alive still needs the gRPC server to answer a call, which a TCP check
// does not: the kernel accepts connections for a process that is wedged.
func runProbe(ctx context.Context, args []string) error {
	fs, cfg := probeFlags()
	if err := parse(fs, args); err != nil {
		return err // a usage error, reported by main like any subcommand's
	}
	if err := probe(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "fleetbroker probe:", oneLine(err.Error()))
		os.Exit(probeUnhealthy)
	}
	return nil
}

// probe asks the server at cfg.addr for the health of cfg.service and
// returns nil only for SERVING (with cfg.alive, for any answer), all within
// cfg.timeout.
func probe(ctx context.Context, cfg *probeConfig) error {
	if cfg.addr == "" {
		return errors.New("--addr is empty")
	}
	if cfg.timeout <= 0 {
		return fmt.Errorf("--timeout must be positive, not %s", cfg.timeout)
	}
	creds, err := probeCredentials(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	conn, err := grpc.NewClient(cfg.addr, grpc.WithTransportCredentials(creds), grpc.WithUserAgent("fleetbroker-probe"))
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.addr, err)
	}
	defer conn.Close()
	// Fail fast (no WaitForReady): a refused connection is reported at once
	// instead of being retried until the timeout.
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: cfg.service})
	if err != nil {
		return fmt.Errorf("%s: %w", cfg.addr, err)
	}
	if s := resp.GetStatus(); s != healthpb.HealthCheckResponse_SERVING && !cfg.alive {
		return fmt.Errorf("%s: %s is %s", cfg.addr, serviceLabel(cfg.service), s)
	}
	return nil
}

// probeCredentials is plaintext with --insecure, else TLS 1.3 (the only
// version fleetbroker serves) with the given CA, client certificate and
// server name. The probe lives for one call, so it reads the files once
// instead of watching them like the servers do.
func probeCredentials(cfg *probeConfig) (credentials.TransportCredentials, error) {
	if cfg.insecure {
		if cfg.caFile != "" || cfg.certFile != "" || cfg.keyFile != "" || cfg.serverName != "" {
			return nil, errors.New("--insecure excludes --tls-ca, --tls-cert, --tls-key and --tls-server-name")
		}
		return insecure.NewCredentials(), nil
	}
	if (cfg.certFile == "") != (cfg.keyFile == "") {
		return nil, errors.New("set both --tls-cert and --tls-key, or neither")
	}
	tc, err := tlsutil.StaticClientConfig(tlsutil.Files{CAFile: cfg.caFile, CertFile: cfg.certFile, KeyFile: cfg.keyFile}, cfg.serverName, tls.VersionTLS13)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca/--tls-cert/--tls-key: %w", err)
	}
	return credentials.NewTLS(tc), nil
}

func serviceLabel(service string) string {
	if service == "" {
		return "the server"
	}
	return fmt.Sprintf("service %q", service)
}

// oneLine keeps a reason on one line, as health check logs show it.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
