package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// TestCredentialsSubcommandServes runs `fleetbroker credentials` the way an
// operator does — flags, real Vault and Redis — and checks it becomes ready
// (readiness checks pass), serves metrics on its own listener, and stops
// cleanly on cancel.
func TestCredentialsSubcommandServes(t *testing.T) {
	vs, rs := testenv.Vault(t), testenv.Redis(t)
	key := vs.NewKeyName(t)
	v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.EnsureKey(context.Background()); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte("grants:\n  - principals: ['key:gw']\n    tenants: [\"*\"]\n    actions: [sessions.resolve]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	grpcAddr, metricsAddr := freeAddr(t), freeAddr(t)
	t.Setenv("FLEETBROKER_VAULT_TOKEN", vs.RootToken)
	t.Setenv("FLEETBROKER_HANDLE_KEY_FILE", writeHandleKeys(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"credentials", "--insecure", "--listen=" + grpcAddr, "--metrics-listen=" + metricsAddr,
			"--vault-addr=" + vs.Addr, "--vault-transit-key=" + key, "--redis-addr=" + rs.Addr, "--redis-prefix=" + testenv.RedisPrefix(t),
			"--policy=" + policy, "--audit-log=" + filepath.Join(dir, "audit.log"), "--readiness-interval=200ms", "--log-level=warn"})
	}()
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never ready: %v %v", resp, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`fleetbroker_readiness_check_passing{check="vault"} 1`, `fleetbroker_readiness_check_passing{check="redis"} 1`, "grpc_server_handled_total"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("credentials did not stop cleanly: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("credentials did not stop within 15s of cancel")
	}
}

// TestRewrapSubcommand stores a credential ciphertext, rotates the transit
// key, and runs `fleetbroker rewrap`: the ciphertext moves to the new key
// version and the run reports it.
func TestRewrapSubcommand(t *testing.T) {
	vs, rs := testenv.Vault(t), testenv.Redis(t)
	key, prefix := vs.NewKeyName(t), testenv.RedisPrefix(t)
	ctx := context.Background()
	v, err := transit.NewVault(ctx, transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.EnsureKey(ctx); err != nil {
		t.Fatal(err)
	}
	aad := []byte("fleetbroker/credential/v1\x00acme\x00c1") // the credentials service's binding
	ct, err := v.Encrypt(ctx, "acme", []transit.Item{{AssociatedData: aad, Plaintext: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	st := store.NewRedis(rs.Client(t), store.RedisOptions{Prefix: prefix})
	if _, err := st.PutCredential(ctx, store.Credential{TenantID: "acme", CredentialID: "c1", Provider: store.ProviderWialon, Ciphertext: ct[0], ValidationState: store.ValidationNotValidated}, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.RotateKey(ctx); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FLEETBROKER_VAULT_TOKEN", vs.RootToken)
	if err := run(ctx, []string{"rewrap", "--vault-addr=" + vs.Addr, "--vault-transit-key=" + key, "--redis-addr=" + rs.Addr, "--redis-prefix=" + prefix}); err != nil {
		t.Fatal(err)
	}
	got, err := st.GetCredential(ctx, "acme", "c1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got.Ciphertext, "vault:v2:") {
		t.Fatalf("ciphertext not rewrapped to v2: %.12s…", got.Ciphertext)
	}
	if got.Version != 1 {
		t.Fatalf("rewrap changed the version to %d", got.Version)
	}
}

// writeHandleKeys writes a handle key file with one fresh key.
func writeHandleKeys(t *testing.T) string {
	t.Helper()
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "handle-keys")
	if err := os.WriteFile(path, []byte("# test key\n"+base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// captureStdout returns what fn printed to standard output.
func captureStdout(t *testing.T, fn func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	orig := os.Stdout
	os.Stdout = w
	out := make(chan string)
	go func() {
		b, _ := io.ReadAll(r)
		out <- string(b)
	}()
	defer func() { os.Stdout = orig }()
	fn()
	_ = w.Close()
	return <-out
}

// TestMigrateSubcommand stores credentials sealed the way the release
// before associated data version 2 sealed them, runs `fleetbroker migrate`
// twice, and checks what it reports: first that it re-encrypted each one,
// then that none was left.
func TestMigrateSubcommand(t *testing.T) {
	vs, rs := testenv.Vault(t), testenv.Redis(t)
	key, prefix := vs.NewKeyName(t), testenv.RedisPrefix(t)
	ctx := context.Background()
	v, err := transit.NewVault(ctx, transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.EnsureKey(ctx); err != nil {
		t.Fatal(err)
	}
	st := store.NewRedis(rs.Client(t), store.RedisOptions{Prefix: prefix})
	for _, id := range []string{"c1", "c2", "c3"} {
		// The version 1 binding: tenant and credential id only.
		aad := []byte("fleetbroker/credential/v1\x00acme\x00" + id)
		plain := []byte("\x0a\x48" + strings.Repeat("t", 72)) // a WialonSecret{token}
		ct, err := v.Encrypt(ctx, "acme", []transit.Item{{AssociatedData: aad, Plaintext: plain}})
		if err != nil {
			t.Fatal(err)
		}
		rec := store.Credential{TenantID: "acme", CredentialID: id, Provider: store.ProviderWialon, BaseURL: "https://hst-api.wialon.com",
			Ciphertext: ct[0], ValidationState: store.ValidationNotValidated}
		if _, err := st.PutCredential(ctx, rec, store.PutOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("FLEETBROKER_VAULT_TOKEN", vs.RootToken)
	args := []string{"migrate", "--vault-addr=" + vs.Addr, "--vault-transit-key=" + key, "--redis-addr=" + rs.Addr, "--redis-prefix=" + prefix, "--log-level=warn"}
	for _, want := range []string{
		"migrate: 3 seen, 3 re-encrypted, 0 already current, 0 skipped (replaced or deleted meanwhile), 0 failed",
		"migrate: 3 seen, 0 re-encrypted, 3 already current, 0 skipped (replaced or deleted meanwhile), 0 failed",
	} {
		var runErr error
		out := captureStdout(t, func() { runErr = run(ctx, args) })
		if runErr != nil {
			t.Fatalf("migrate: %v", runErr)
		}
		if !strings.Contains(out, want) {
			t.Fatalf("migrate printed %q, want %q", out, want)
		}
	}
	for _, id := range []string{"c1", "c2", "c3"} {
		got, err := st.GetCredential(ctx, "acme", id)
		if err != nil || got.ADVersion != 2 || got.Version != 1 {
			t.Fatalf("%s after migrate: associated data version %d, version %d, %v; want 2, 1", id, got.ADVersion, got.Version, err)
		}
	}
}
