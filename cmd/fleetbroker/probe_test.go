package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
)

// healthServer serves grpc.health.v1 on a loopback port until the test
// ends: the whole server ("") and "fleetbroker.test.Up" are SERVING,
// "fleetbroker.test.Down" is NOT_SERVING.
func healthServer(t *testing.T, opts ...grpc.ServerOption) (addr string, hs *health.Server) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	hs = health.NewServer()
	hs.SetServingStatus("fleetbroker.test.Up", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("fleetbroker.test.Down", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), hs
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

// probeArgs parses args like `fleetbroker probe` does.
func probeArgs(t *testing.T, args ...string) *probeConfig {
	t.Helper()
	fs, cfg := probeFlags()
	if err := parse(fs, args); err != nil {
		t.Fatalf("probe %v: %v", args, err)
	}
	return cfg
}

func TestProbePlaintext(t *testing.T) {
	addr, hs := healthServer(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string // "" means healthy
	}{
		{"server serving", []string{"--addr=" + addr, "--insecure"}, ""},
		{"service serving", []string{"--addr=" + addr, "--insecure", "--service=fleetbroker.test.Up"}, ""},
		{"service not serving", []string{"--addr=" + addr, "--insecure", "--service=fleetbroker.test.Down"}, `service "fleetbroker.test.Down" is NOT_SERVING`},
		{"service not serving but alive", []string{"--addr=" + addr, "--insecure", "--service=fleetbroker.test.Down", "--alive"}, ""},
		{"unknown service, alive or not", []string{"--addr=" + addr, "--insecure", "--service=fleetbroker.test.Missing", "--alive"}, "NotFound"},
		{"unknown service", []string{"--addr=" + addr, "--insecure", "--service=fleetbroker.test.Missing"}, "NotFound"},
		{"TLS to a plaintext server", []string{"--addr=" + addr}, "Unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := probe(context.Background(), probeArgs(t, tt.args...))
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("probe = %v, want healthy", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("probe = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}

	// Shutdown is what a draining server reports (internal/server).
	hs.Shutdown()
	if err := probe(context.Background(), probeArgs(t, "--addr="+addr, "--insecure")); err == nil || !strings.Contains(err.Error(), "the server is NOT_SERVING") {
		t.Fatalf("probe of a draining server = %v, want NOT_SERVING", err)
	}
	if err := probe(context.Background(), probeArgs(t, "--addr="+addr, "--insecure", "--alive")); err != nil {
		t.Fatalf("probe --alive of a draining server = %v, want alive", err)
	}
}

// TestProbeGivesUpWithinTimeout: nothing listening fails at once; a peer
// that accepts the connection and never answers fails when --timeout ends.
func TestProbeGivesUpWithinTimeout(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	go func() {
		var conns []net.Conn // held open, never answered
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()

	const timeout = 500 * time.Millisecond
	for name, addr := range map[string]string{"nothing listening": closedAddr(t), "silent peer": silent.Addr().String()} {
		for _, mode := range []string{"--alive=false", "--alive"} {
			t.Run(name+" "+mode, func(t *testing.T) {
				start := time.Now()
				err := probe(context.Background(), probeArgs(t, "--addr="+addr, "--insecure", "--timeout="+timeout.String(), mode))
				took := time.Since(start)
				if err == nil {
					t.Fatal("probe succeeded")
				}
				if took > timeout+time.Second {
					t.Fatalf("probe took %s with --timeout=%s", took, timeout)
				}
			})
		}
	}
}

// TestProbeMTLS is the Kubernetes exec probe: the server requires client
// certificates, and the probe presents the pod's own certificate.
func TestProbeMTLS(t *testing.T) {
	pki := testenv.NewPKI(t)
	serverCert, serverKey := pki.Issue(t, "credentials", testenv.IssueOptions{
		DNSNames: []string{"credentials"},
		URIs:     []string{"spiffe://example.org/ns/fleetbroker/sa/credentials"},
	})
	reloader, tlsCfg, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: serverCert, KeyFile: serverKey, CAFile: pki.CAFile()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reloader.Close() })
	addr, _ := healthServer(t, grpc.Creds(credentials.NewTLS(tlsCfg)))
	_, port, _ := net.SplitHostPort(addr)
	local := "localhost:" + port // as in the manifests: the pod probes itself
	other := testenv.NewPKI(t)
	foreignCert, foreignKey := other.Issue(t, "intruder", testenv.IssueOptions{})

	tls := []string{"--tls-ca=" + pki.CAFile(), "--tls-server-name=credentials"}
	tests := []struct {
		name    string
		args    []string
		healthy bool
	}{
		{"own certificate", append([]string{"--addr=" + local, "--tls-cert=" + serverCert, "--tls-key=" + serverKey}, tls...), true},
		{"no client certificate", append([]string{"--addr=" + local}, tls...), false},
		{"certificate of another CA", append([]string{"--addr=" + local, "--tls-cert=" + foreignCert, "--tls-key=" + foreignKey}, tls...), false},
		{"wrong server name", []string{"--addr=" + local, "--tls-cert=" + serverCert, "--tls-key=" + serverKey, "--tls-ca=" + pki.CAFile(), "--tls-server-name=gateway"}, false},
		{"server CA not trusted", []string{"--addr=" + local, "--tls-cert=" + serverCert, "--tls-key=" + serverKey, "--tls-server-name=credentials"}, false},
		{"plaintext", []string{"--addr=" + local, "--insecure"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := probe(context.Background(), probeArgs(t, append(tt.args, "--timeout=5s")...))
			if tt.healthy != (err == nil) {
				t.Fatalf("probe = %v, want healthy %v", err, tt.healthy)
			}
		})
	}
}

func TestProbeConfigErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := dir + "/ca.crt"
	if err := os.WriteFile(notPEM, []byte("REPLACE-ME"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--insecure", "--tls-ca=" + notPEM}, "--insecure excludes"},
		{[]string{"--tls-cert=" + notPEM}, "set both --tls-cert and --tls-key"},
		{[]string{"--tls-ca=" + notPEM}, "no PEM certificate"},
		{[]string{"--tls-ca=" + dir + "/missing.crt"}, "no such file"},
		{[]string{"--tls-cert=" + notPEM, "--tls-key=" + notPEM}, "--tls-cert/--tls-key"},
		{[]string{"--addr=", "--insecure"}, "--addr is empty"},
		{[]string{"--timeout=0s", "--insecure"}, "--timeout must be positive"},
	}
	for _, tt := range tests {
		err := probe(context.Background(), probeArgs(t, tt.args...))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("probe %v = %v, want an error containing %q", tt.args, err, tt.want)
		}
	}
}

// TestProbeEnvironment: like every subcommand, the probe reads
// FLEETBROKER_<FLAG> for flags not on the command line; a HEALTHCHECK inherits
// the server container's FLEETBROKER_INSECURE this way.
func TestProbeEnvironment(t *testing.T) {
	addr, _ := healthServer(t)
	t.Setenv("FLEETBROKER_ADDR", addr)
	t.Setenv("FLEETBROKER_INSECURE", "true")
	t.Setenv("FLEETBROKER_SERVICE", "fleetbroker.test.Down")
	if err := probe(context.Background(), probeArgs(t)); err == nil || !strings.Contains(err.Error(), "NOT_SERVING") {
		t.Fatalf("probe from the environment = %v, want NOT_SERVING of fleetbroker.test.Down", err)
	}
	if err := probe(context.Background(), probeArgs(t, "--service=fleetbroker.test.Up")); err != nil {
		t.Fatalf("a flag must win over the environment: %v", err)
	}
}

// TestProbeExitStatus runs the real binary entry point (main, through the
// subcommand list) in a child process, since a failed probe exits by itself.
func TestProbeExitStatus(t *testing.T) {
	addr, _ := healthServer(t)
	tests := []struct {
		name       string
		args       []string
		wantStatus int
		wantStderr string
	}{
		{"serving", []string{"probe", "--addr=" + addr, "--insecure"}, 0, ""},
		{"not serving", []string{"probe", "--addr=" + addr, "--insecure", "--service=fleetbroker.test.Down"}, probeUnhealthy, "NOT_SERVING"},
		{"not serving but alive", []string{"probe", "--addr=" + addr, "--insecure", "--service=fleetbroker.test.Down", "--alive"}, 0, ""},
		{"nothing listening", []string{"probe", "--addr=" + closedAddr(t), "--insecure", "--timeout=1s"}, probeUnhealthy, "Unavailable"},
		{"unknown flag", []string{"probe", "--no-such-flag"}, 2, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestProbeHelperProcess$", "--"}, tt.args...)...)
			cmd.Env = append(cleanEnv(), "FLEETBROKER_PROBE_HELPER=1")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			status := 0
			var exitErr *exec.ExitError
			if errors.As(err, &exitErr) {
				status = exitErr.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if status != tt.wantStatus {
				t.Fatalf("exit status %d, want %d (stderr %q)", status, tt.wantStatus, stderr.String())
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing", stdout.String())
			}
			if tt.wantStderr == "" {
				if stderr.Len() != 0 {
					t.Errorf("stderr %q, want nothing", stderr.String())
				}
				return
			}
			if !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr.String(), tt.wantStderr)
			}
			if tt.wantStatus == probeUnhealthy && strings.Count(strings.TrimSuffix(stderr.String(), "\n"), "\n") != 0 {
				t.Errorf("stderr %q, want one line", stderr.String())
			}
		})
	}
}

// TestProbeHelperProcess is the child of TestProbeExitStatus: it runs main
// with the arguments after "--". In a normal test run it does nothing.
func TestProbeHelperProcess(t *testing.T) {
	if os.Getenv("FLEETBROKER_PROBE_HELPER") != "1" {
		return
	}
	for i, a := range os.Args {
		if a == "--" {
			os.Args = append([]string{"fleetbroker"}, os.Args[i+1:]...)
			break
		}
	}
	main()
	os.Exit(0)
}

// cleanEnv is the environment without FLEETBROKER_* variables, so the
// child's flags are only the ones the test gives.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLEETBROKER_") {
			env = append(env, kv)
		}
	}
	return env
}
