package transit_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// TestServicePoliciesAreLeastPrivilege applies the Vault policies shipped in
// deploy/vault to the real Vault and checks that each service can do what
// it needs and nothing more: above all, the gateway cannot decrypt customer
// secrets.
func TestServicePoliciesAreLeastPrivilege(t *testing.T) {
	srv := testenv.Vault(t)
	root := rootClient(t, srv)
	ctx := context.Background()
	for _, key := range []string{"fleetbroker", "fleetbroker-gateway"} {
		admin := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, nil)
		if err := admin.EnsureKey(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for name, file := range map[string]string{"fleetbroker-credentials": "credentials.hcl", "fleetbroker-gateway": "gateway.hcl"} {
		rules, err := os.ReadFile("../../deploy/vault/" + file)
		if err != nil {
			t.Fatal(err)
		}
		if err := root.Sys().PutPolicyWithContext(ctx, name, string(rules)); err != nil {
			t.Fatalf("policy %s does not load: %v", file, err)
		}
	}
	as := func(policy, key string) *transit.Vault {
		return newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: createToken(t, root, "10m", policy), Key: key}, nil)
	}
	creds := as("fleetbroker-credentials", "fleetbroker")
	credsOnGatewayKey := as("fleetbroker-credentials", "fleetbroker-gateway")
	gw := as("fleetbroker-gateway", "fleetbroker-gateway")
	gwOnSecretsKey := as("fleetbroker-gateway", "fleetbroker")

	item := transit.Item{AssociatedData: []byte("tenant/credential"), Plaintext: []byte(secretText)}
	cts, err := creds.Encrypt(ctx, "acme", []transit.Item{item})
	if err != nil {
		t.Fatalf("credentials cannot encrypt: %v", err)
	}
	sealed := transit.Item{AssociatedData: item.AssociatedData, Ciphertext: cts[0]}
	dk, err := gw.GenerateDataKey(ctx, "acme")
	if err != nil {
		t.Fatalf("gateway cannot make a data key: %v", err)
	}

	tests := []struct {
		name    string
		call    func() error
		allowed bool
	}{
		{"credentials decrypts secrets", func() error { _, err := creds.Decrypt(ctx, "acme", []transit.Item{sealed}); return err }, true},
		{"credentials rewraps secrets", func() error { _, err := creds.Rewrap(ctx, "acme", []transit.Item{sealed}); return err }, true},
		{"credentials fingerprints", func() error { _, err := creds.HMAC(ctx, []byte("x")); return err }, true},
		{"credentials cannot rotate the key", func() error { return creds.RotateKey(ctx) }, false},
		{"credentials cannot make gateway data keys", func() error { _, err := credsOnGatewayKey.GenerateDataKey(ctx, "acme"); return err }, false},
		{"gateway unwraps its data keys", func() error { _, err := gw.UnwrapDataKey(ctx, "acme", dk.Wrapped); return err }, true},
		{"gateway cannot decrypt customer secrets", func() error { _, err := gwOnSecretsKey.Decrypt(ctx, "acme", []transit.Item{sealed}); return err }, false},
		{"gateway cannot encrypt under the secrets key", func() error { _, err := gwOnSecretsKey.Encrypt(ctx, "acme", []transit.Item{item}); return err }, false},
		{"gateway cannot rotate its key", func() error { return gw.RotateKey(ctx) }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			switch {
			case tt.allowed && err != nil:
				t.Fatalf("denied: %v", err)
			case !tt.allowed && !errors.Is(err, transit.ErrInvalid):
				t.Fatalf("want permission denied (ErrInvalid), got %v", err)
			}
		})
	}
}
