package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// DevConfig configures `fleetbroker dev`.
type DevConfig struct {
	// Listen serves every gRPC service (default localhost:7400).
	Listen string
	// SimulatorListen serves the Wialon/FleetUp simulator (default localhost:7480).
	SimulatorListen  string
	AllowedUpstreams string
	Reflection       bool
	MaxSessionTTL    time.Duration
	// MetricsListen serves Prometheus metrics ("" to turn off).
	MetricsListen string
	// FleetUpRate is FleetUp requests per second per account (the
	// simulator does not need FleetUp's 1/s guidance).
	FleetUpRate int
	// ListenAnywhere lets Listen and MetricsListen bind addresses other
	// than loopback. Dev lets every caller do everything, so by default it
	// refuses to be reachable from other machines.
	ListenAnywhere bool
	// Out receives the printed walkthrough (stdout).
	Out io.Writer
	// AuthorizeListen serves the Wialon authorization callback (default
	// localhost:7403; empty: off); AuthorizeReturnURLs are return URLs
	// allowed besides dev's own page.
	AuthorizeListen     string
	AuthorizeReturnURLs string
}

// Demo tenant and credential ids seeded by `fleetbroker dev`.
const (
	DemoTenant            = "demo"
	DemoWialonCredential  = "wialon-demo"
	DemoFleetUpCredential = "fleetup-demo"
)

const devBanner = `
==========================================================================
 fleetbroker dev: DEVELOPMENT MODE. NOT FOR PRODUCTION.
 Secrets are encrypted by an in-memory dev keyring (not Vault), stored in an
 in-process Redis that forgets everything on exit, and served over plaintext
 gRPC with no caller authentication.
==========================================================================`

// RunDev runs every service in one process on embedded defaults: an
// in-process Redis-protocol server (so the real go-redis code runs), the dev
// keyring in place of Vault, the simulator, and the gRPC services on one port.
func RunDev(ctx context.Context, cfg DevConfig, logger *slog.Logger) error {
	logger.Warn("fleetbroker dev: development mode, not for production: dev keyring instead of Vault, in-memory Redis, no TLS, no caller authentication")
	if cfg.ListenAnywhere {
		logger.Warn("fleetbroker dev: --dev-listen-anywhere: every machine that reaches these ports may read and write every credential")
	}
	fmt.Fprintln(cfg.Out, devBanner)

	mini, err := miniredis.Run()
	if err != nil {
		return fmt.Errorf("start in-process redis: %w", err)
	}
	defer mini.Close()
	// The production client: every call bounded, no client retries.
	rdb, err := NewRedis(ctx, RedisConfig{Addrs: []string{mini.Addr()}})
	if err != nil {
		return fmt.Errorf("in-process redis: %w", err)
	}
	defer rdb.Close()
	metrics := telemetry.NewMetrics()
	if err := instrumentRedis(rdb, metrics); err != nil {
		return err
	}
	keyring, err := transit.NewKeyring()
	if err != nil {
		return fmt.Errorf("dev keyring: %w", err)
	}
	// Handle keys live as long as the process, like every handle it issues.
	handleKeys, err := handle.GenerateKeys()
	if err != nil {
		return fmt.Errorf("dev handle keys: %w", err)
	}

	simLis, err := net.Listen("tcp", cfg.SimulatorListen)
	if err != nil {
		return fmt.Errorf("simulator: listen on %s: %w", cfg.SimulatorListen, err)
	}
	simAddr := displayAddr(cfg.SimulatorListen, simLis) // keep the name the user gave (localhost:7480)
	simURL := "http://" + simAddr
	grpcLis, err := listenDev("--listen", cfg.Listen, cfg.ListenAnywhere)
	if err != nil {
		simLis.Close()
		return err
	}
	if cfg.MetricsListen != "" && !cfg.ListenAnywhere {
		if err := checkLoopbackAddr("--metrics-listen", cfg.MetricsListen); err != nil {
			simLis.Close()
			grpcLis.Close()
			return err
		}
	}

	credCfg := CredentialsConfig{
		AllowedUpstreams: joinList(cfg.AllowedUpstreams, simAddr+","+simLis.Addr().String()),
		MaxSessionTTL:    cfg.MaxSessionTTL,
		Metrics:          metrics,
		HandleKeys:       handleKeys,
		RedisClient:      rdb,
	}
	// Nothing in a fresh in-process Redis predates keyed handles: legacy
	// ones are refused from the start, by both services.
	credCfg.LegacyHandles = handle.NewLegacyWindow(rdb, "fb")
	if _, err := credCfg.LegacyHandles.Close(ctx, 0); err != nil {
		return fmt.Errorf("in-process redis: %w", err)
	}
	authURL, err := devAuthorize(cfg, &credCfg)
	if err != nil {
		simLis.Close()
		grpcLis.Close()
		return err
	}
	// Dev runs without TLS and lets every caller do everything, as its
	// banner says; the audit trail still runs, to stderr.
	sec, srvCfg, err := buildSecurity(SecurityConfig{Insecure: true, AuditLog: "-"},
		observed(server.Config{Reflection: cfg.Reflection, Logger: logger}, metrics), authz.Rules(credentials.Actions, gateway.SessionMethods), handleKeys, false, policy.Static(policy.AllowAll()), rdb, "fb", logger)
	if err != nil {
		return err
	}
	defer sec.Close()
	credCfg.Authorizer = sec.authorizer
	credCfg.Audit = sec.audit
	svc, err := NewCredentialsService(credCfg, store.NewRedis(rdb, store.RedisOptions{}), keyring, logger)
	if err != nil {
		return err
	}
	// The gateway reaches the credentials service over gRPC on the same
	// port, exactly as it does when the two run apart.
	selfConn, err := grpc.NewClient(grpcLis.Addr().String(),
		append(metrics.ClientDialOptions(), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		return err
	}
	defer selfConn.Close()
	gw, err := NewGatewayService(GatewayConfig{
		AllowedUpstreams: credCfg.AllowedUpstreams,
		HandleCacheTTL:   gateway.DefaultHandleCacheTTL,
		HandleKeys:       handleKeys,
		FleetUpRate:      cfg.FleetUpRate,
		FleetUpBurst:     cfg.FleetUpRate,
		Metrics:          metrics,
	}, credentialsv1.NewSessionServiceClient(selfConn), rdb, keyring, logger)
	if err != nil {
		return err
	}
	defer gw.Close()
	srv, err := server.New(srvCfg, svc.Register, gw.Register)
	if err != nil {
		return err
	}
	sec.checkRules(srv, logger)
	sim := simulator.New(simulator.Config{Demo: true})
	simServer := &http.Server{Handler: sim.Handler(), ReadHeaderTimeout: 5 * time.Second}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ServeHTTP(gctx, simServer, simLis) })
	g.Go(func() error { return srv.ServeListener(gctx, grpcLis) })
	g.Go(func() error { return svc.RunBackground(gctx) })
	if credCfg.Authorize.enabled() {
		authorize := newAuthorizeServer(credCfg.Authorize, devAuthorizeHandler(svc.AuthorizeHandler()), nil, logger)
		g.Go(func() error { return authorize.Serve(gctx) })
	}
	if cfg.MetricsListen != "" {
		g.Go(func() error { return telemetry.Serve(gctx, cfg.MetricsListen, metrics.Handler(), logger) })
	}
	g.Go(func() error {
		if err := seedDemo(gctx, grpcLis.Addr().String(), simURL); err != nil {
			return fmt.Errorf("seed demo tenant: %w", err)
		}
		// One write, so whoever waits for "is ready" reads all of it.
		var walkthrough strings.Builder
		printWalkthrough(&walkthrough, displayAddr(cfg.Listen, grpcLis), simURL)
		if authURL != "" {
			printConnectWalkthrough(&walkthrough, displayAddr(cfg.Listen, grpcLis), simURL, authURL)
		}
		fmt.Fprint(cfg.Out, walkthrough.String())
		return nil
	})
	return g.Wait()
}

// listenDev listens on addr, and unless anywhere is set refuses any bound
// address that is not loopback: dev serves every RPC to every caller.
func listenDev(flagName, addr string, anywhere bool) (net.Listener, error) {
	if !anywhere {
		if err := checkLoopbackAddr(flagName, addr); err != nil {
			return nil, err
		}
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", flagName, addr, err)
	}
	if !anywhere {
		if ip := lis.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
			lis.Close()
			return nil, errNotLoopback(flagName, addr)
		}
	}
	return lis, nil
}

// checkLoopbackAddr accepts host:port addresses whose host is "localhost"
// or a loopback IP; an empty host (every interface) and other names are
// refused, since dev has no caller authentication.
func checkLoopbackAddr(flagName, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s %q: %w", flagName, addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return errNotLoopback(flagName, addr)
}

func errNotLoopback(flagName, addr string) error {
	return fmt.Errorf("%s %s is not a loopback address: fleetbroker dev lets every caller do everything, without authentication; "+
		"listen on localhost, or pass --dev-listen-anywhere if every machine that can reach it may read and write every credential", flagName, addr)
}

// ServeHTTP serves until ctx is done, then shuts down within 5 s.
func ServeHTTP(ctx context.Context, srv *http.Server, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// seedDemo stores the simulator's demo credentials through the public API,
// so they are validated and encrypted exactly like a customer's.
func seedDemo(ctx context.Context, grpcAddr, simURL string) error {
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := credentialsv1.NewCredentialServiceClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	puts := []*credentialsv1.PutCredentialRequest{
		{TenantId: DemoTenant, CredentialId: DemoWialonCredential, Labels: map[string]string{"source": "simulator"},
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: simURL}}},
		{TenantId: DemoTenant, CredentialId: DemoFleetUpCredential, Labels: map[string]string{"source": "simulator"},
			Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
				ApiKey: simulator.DemoFleetUpAPIKey, AccountId: simulator.DemoFleetUpAccountID, Secret: simulator.DemoFleetUpSecret, BaseUrl: simURL}}},
	}
	for _, req := range puts {
		if _, err := client.PutCredential(ctx, req, grpc.WaitForReady(true)); err != nil {
			return fmt.Errorf("put %s: %w", req.GetCredentialId(), err)
		}
	}
	return nil
}

func printWalkthrough(out io.Writer, grpcAddr, simURL string) {
	fmt.Fprintf(out, `
fleetbroker dev is ready.
  gRPC (credentials, sessions, telematics):  %[1]s
  simulator (Wialon + FleetUp):              %[2]s   (login/mint counters: %[2]s/sim/stats)
  demo tenant %[3]q with credentials %[4]q and %[5]q

Try (grpcurl: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3):
  grpcurl -plaintext %[1]s list
  grpcurl -plaintext -d '{"tenant_id":"%[3]s"}' %[1]s fleetbroker.credentials.v1.CredentialService/ListCredentials

  # a 10-minute session handle for the Wialon demo credential (use %[5]q for FleetUp)
  HANDLE=$(grpcurl -plaintext -d '{"tenant_id":"%[3]s","credential_id":"%[4]s","ttl":"600s"}' %[1]s fleetbroker.credentials.v1.SessionService/IssueSession | grep -o 'fbs_[A-Za-z0-9]*')

  grpcurl -plaintext -H "authorization: Bearer $HANDLE" -d '{"page_size":5}' %[1]s fleetbroker.telematics.v1.TelematicsService/ListUnits
  grpcurl -plaintext -H "authorization: Bearer $HANDLE" %[1]s fleetbroker.telematics.v1.TelematicsService/GetLatestPositions
  grpcurl -plaintext -H "authorization: Bearer $HANDLE" -d '{"min_interval":"2s"}' %[1]s fleetbroker.telematics.v1.TelematicsService/WatchPositions
  grpcurl -plaintext -d "{\"handle\":\"$HANDLE\"}" %[1]s fleetbroker.credentials.v1.SessionService/RevokeSession
`, grpcAddr, simURL, DemoTenant, DemoWialonCredential, DemoFleetUpCredential)
}

func joinList(list, extra string) string {
	if strings.TrimSpace(list) == "" {
		return extra
	}
	return list + "," + extra
}

// displayAddr is the address to print for a listener: the configured one if
// it names a host, else the bound one.
func displayAddr(configured string, lis net.Listener) string {
	if host, port, _ := net.SplitHostPort(configured); host != "" && port != "0" {
		return configured
	}
	return lis.Addr().String()
}
