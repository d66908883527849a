package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// TestCheckConfigAuthorize: `fleetbroker credentials --check-config` builds
// the Wialon authorization flow from its flags and names each broken one.
func TestCheckConfigAuthorize(t *testing.T) {
	vs, rs := testenv.Vault(t), testenv.Redis(t)
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte("grants:\n  - principals: ['key:gw']\n    tenants: [\"*\"]\n    actions: [sessions.resolve]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("FLEETBROKER_VAULT_TOKEN", vs.RootToken)
	base := []string{"credentials", "--check-config", "--insecure", "--vault-addr=" + vs.Addr, "--redis-addr=" + rs.Addr,
		"--audit-log=" + filepath.Join(dir, "audit.log"), "--policy=" + policy, "--handle-key-file=" + writeHandleKeys(t)}
	flow := []string{"--authorize-listen=127.0.0.1:0", "--public-url=https://connect.example.com", "--authorize-return-urls=https://app.example.com/settings"}
	for _, tt := range []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"off", nil, ""},
		{"on", flow, ""},
		{"rights as decimal", append(flow, "--wialon-access-type=768"), ""},
		{"full access allowed", append(flow, "--wialon-access-type=-1", "--wialon-allow-full-access"), ""},
		{"full access not allowed", append(flow, "--wialon-access-type=-1"), "--wialon-allow-full-access"},
		{"unknown rights", append(flow, "--wialon-access-type=0x4000"), "access type"},
		{"rights not a number", append(flow, "--wialon-access-type=all"), "--wialon-access-type"},
		{"no return URLs", []string{"--authorize-listen=127.0.0.1:0", "--public-url=https://connect.example.com"}, "--authorize-return-urls"},
		{"http return URL", append(flow, "--authorize-return-urls=http://app.example.com"), "--authorize-return-urls"},
		{"no public URL", []string{"--authorize-listen=127.0.0.1:0", "--authorize-return-urls=https://app.example.com"}, "--public-url"},
		{"http public URL", append(flow, "--public-url=http://connect.example.com"), "https"},
		{"callback certificate missing", append(flow, "--authorize-tls-cert="+filepath.Join(dir, "nope.crt"), "--authorize-tls-key="+filepath.Join(dir, "nope.key")), "--authorize-tls-cert"},
	} {
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
