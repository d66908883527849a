package transit_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/transit/transittest"
)

func newKeyring(t *testing.T) *transit.Keyring {
	t.Helper()
	k, err := transit.NewKeyring()
	if err != nil {
		t.Fatalf("NewKeyring: %v", err)
	}
	return k
}

func TestKeyringConformance(t *testing.T) {
	transittest.Run(t, func(t *testing.T) transit.Rotatable { return newKeyring(t) })
}

func TestKeyringCiphertextFormat(t *testing.T) {
	k := newKeyring(t)
	cts, err := k.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte("secret")}})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if !strings.HasPrefix(cts[0], "fbdev:v1:") {
		t.Errorf("ciphertext %q does not start with fbdev:v1:", cts[0])
	}
}

// Each Keyring has its own master key: a ciphertext from one dev process
// does not open in another, and Vault's ciphertexts are refused outright.
func TestKeyringRejectsForeignCiphertexts(t *testing.T) {
	a, b := newKeyring(t), newKeyring(t)
	cts, err := a.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte("secret")}})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	tests := []struct {
		name       string
		ciphertext string
	}{
		{"other keyring", cts[0]},
		{"vault ciphertext", "vault:v1:" + strings.SplitN(cts[0], ":", 3)[2]},
		{"version zero", strings.Replace(cts[0], ":v1:", ":v0:", 1)},
		{"negative version", strings.Replace(cts[0], ":v1:", ":v-1:", 1)},
		{"no version", strings.Replace(cts[0], ":v1:", ":1:", 1)},
		{"body too short", "fbdev:v1:AAAA"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.Decrypt(t.Context(), "tenant-a", []transit.Item{{Ciphertext: tc.ciphertext}})
			if !errors.Is(err, transit.ErrDecrypt) {
				t.Errorf("Decrypt = %v, want ErrDecrypt", err)
			}
		})
	}
}
