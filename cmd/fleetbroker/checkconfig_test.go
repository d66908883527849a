package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// TestCheckConfig runs `fleetbroker credentials --check-config` against a
// real Vault and Redis: a good configuration passes without serving, and
// each broken piece is named.
func TestCheckConfig(t *testing.T) {
	vs, rs := testenv.Vault(t), testenv.Redis(t)
	dir := t.TempDir()
	goodPolicy := filepath.Join(dir, "policy.yaml")
	badPolicy := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(goodPolicy, []byte("grants:\n  - principals: ['key:gw']\n    tenants: [\"*\"]\n    actions: [sessions.resolve]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(badPolicy, []byte("grants:\n  - principals: ['key:gw']\n    tenants: [\"*\"]\n    actions: [sessions.everything]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys := writeHandleKeys(t)
	badKeys := filepath.Join(dir, "short-keys")
	if err := os.WriteFile(badKeys, []byte("c2hvcnQ=\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"credentials", "--check-config", "--insecure", "--vault-addr=" + vs.Addr, "--redis-addr=" + rs.Addr, "--audit-log=" + filepath.Join(dir, "audit.log"), "--handle-key-file=" + keys}
	t.Setenv("FLEETBROKER_VAULT_TOKEN", vs.RootToken)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"good", []string{"--policy=" + goodPolicy}, ""},
		{"invalid policy", []string{"--policy=" + badPolicy}, "sessions.everything"},
		{"no policy", nil, "--policy is required"},
		{"no handle keys", []string{"--policy=" + goodPolicy, "--handle-key-file="}, "--handle-key-file is required"},
		{"short handle key", []string{"--policy=" + goodPolicy, "--handle-key-file=" + badKeys}, "key 1 has 5 bytes"},
		{"redis unreachable", []string{"--policy=" + goodPolicy, "--redis-addr=127.0.0.1:1", "--redis-timeout=200ms"}, "redis"},
		{"tls key missing", []string{"--policy=" + goodPolicy, "--tls-cert=" + filepath.Join(dir, "nope.crt"), "--tls-key=" + filepath.Join(dir, "nope.key")}, "--tls-cert"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(context.Background(), append(append([]string{}, base...), tt.args...))
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("good configuration rejected: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("got %v, want an error naming %q", err, tt.wantErr)
			}
		})
	}
}

// TestConfigValidatedBeforeDialling is issue 12's "config first": a
// subcommand whose settings are wrong says so — every problem at once —
// even when Vault and Redis are unreachable, instead of failing on the
// first dial. Nothing listens on 127.0.0.1:1, so any dial would fail with a
// different error.
func TestConfigValidatedBeforeDialling(t *testing.T) {
	dead := []string{"--vault-addr=http://127.0.0.1:1", "--redis-addr=127.0.0.1:1", "--redis-timeout=200ms"}
	t.Setenv("FLEETBROKER_VAULT_TOKEN", "not-a-real-token")
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"credentials without TLS or --insecure", []string{"credentials"},
			[]string{"refusing to serve plaintext", "--policy is required", "--handle-key-file is required"}},
		{"credentials --check-config without TLS", []string{"credentials", "--check-config"},
			[]string{"refusing to serve plaintext"}},
		{"gateway without TLS or --insecure", []string{"gateway"},
			[]string{"refusing to serve plaintext", "--handle-key-file is required", "--credentials-ca is required"}},
		{"rewrap with TLS files but no --redis-tls", []string{"rewrap", "--redis-tls-ca=/nonexistent"},
			[]string{"--redis-tls"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := run(context.Background(), append(append([]string{}, tt.args...), dead...))
			if err == nil {
				t.Fatal("a broken configuration was accepted")
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not name %q:\n%v", want, err)
				}
			}
			for _, dialled := range []string{"connection refused", "127.0.0.1:1"} {
				if strings.Contains(err.Error(), dialled) {
					t.Errorf("error comes from a dial (%q), not the configuration check:\n%v", dialled, err)
				}
			}
		})
	}
}
