// Package transit encrypts and decrypts secrets the way HashiCorp Vault's
// transit engine does: one named key with derived=true, a per-tenant key
// derived from the context, and associated data that binds each ciphertext to
// the row it belongs to, so a ciphertext copied to another tenant or
// credential fails to decrypt.
//
// Two implementations share one conformance suite (transittest): Vault, for
// production, and Keyring, a local AES-256-GCM keyring for `fleetbroker dev`
// only. Nothing in this package ever logs or returns plaintext in an error.
//
// Vault logs in with a token, AppRole (role_id and secret_id files, the
// secret_id optionally response-wrapped) or Kubernetes (the pod's service
// account JWT), as VaultConfig.Auth says, over TLS with VaultConfig.CACert
// and in VaultConfig.Namespace if set. One goroutine per Vault keeps the
// token alive: it renews it, and logs in again when it can no longer be
// renewed or Vault has revoked it. No token, secret_id or JWT is ever
// logged or put in an error.
package transit

import (
	"context"
	"errors"
	"fmt"
)

// Item is one value to encrypt or decrypt under a tenant's derived key.
type Item struct {
	// AssociatedData is authenticated but not encrypted; decryption fails
	// unless the same bytes are given again.
	AssociatedData []byte
	// Plaintext on encrypt; Ciphertext (e.g. "vault:v1:...") on decrypt and rewrap.
	Plaintext  []byte
	Ciphertext string
}

// DataKey is a fresh 256-bit data key and its wrapped (encrypted) form.
type DataKey struct {
	Plaintext []byte
	Wrapped   string
}

// Transit is what fleetbroker needs from Vault's transit engine. Tenant is
// the derivation context; it must not be empty.
type Transit interface {
	// Encrypt encrypts items in one batch call and returns ciphertexts in order.
	Encrypt(ctx context.Context, tenant string, items []Item) ([]string, error)
	// Decrypt decrypts items in one batch call and returns plaintexts in order.
	Decrypt(ctx context.Context, tenant string, items []Item) ([][]byte, error)
	// Rewrap re-encrypts items under the newest key version, keeping each
	// item's tenant and associated data, and returns the new ciphertexts in
	// order. The plaintext is never returned to the caller (but see
	// Vault.Rewrap for where it exists in memory).
	Rewrap(ctx context.Context, tenant string, items []Item) ([]string, error)
	// GenerateDataKey returns a new data key for envelope encryption
	// (transit datakey/wrapped), bound to tenant.
	GenerateDataKey(ctx context.Context, tenant string) (DataKey, error)
	// UnwrapDataKey decrypts a wrapped data key made by GenerateDataKey.
	UnwrapDataKey(ctx context.Context, tenant string, wrapped string) ([]byte, error)
	// HMAC returns a keyed SHA-256 HMAC of data (transit hmac), for
	// non-reversible fingerprints. It uses the newest key version, so the
	// MAC of the same data changes after a key rotation.
	HMAC(ctx context.Context, data []byte) ([]byte, error)
}

// Rotatable is a Transit whose key can be rotated: new ciphertexts use the
// new version, old ones keep decrypting until rewrapped. Both Vault and
// Keyring implement it; the conformance suite in transittest needs it.
type Rotatable interface {
	Transit
	RotateKey(ctx context.Context) error
}

var (
	// ErrUnavailable means the backend could not be reached or answered
	// with a server error; retrying later may help.
	ErrUnavailable = errors.New("transit: backend unavailable")
	// ErrDecrypt means a ciphertext did not decrypt: wrong tenant, wrong
	// associated data, tampered or malformed, or unknown key version.
	ErrDecrypt = errors.New("transit: ciphertext does not decrypt")
	// ErrInvalid means a malformed request (such as an empty tenant) or a
	// backend refusal such as permission denied. A ciphertext that does not
	// decrypt, malformed or not, is ErrDecrypt; a missing key ErrKeyMissing.
	ErrInvalid = errors.New("transit: invalid request")
	// ErrKeyMissing means the backend has no such key, or no transit
	// engine at the configured mount: the key was deleted, or Vault lost it
	// (restored without it, a dev server restarted). Nothing encrypts or
	// decrypts until an operator restores it; until then, retrying helps
	// only once that is done.
	ErrKeyMissing = errors.New("transit: key not found")
)

// requireTenant rejects the empty tenant: with no derivation context every
// tenant would share one key.
func requireTenant(impl, op, tenant string) error {
	if tenant == "" {
		return fmt.Errorf("%s %s: empty tenant: %w", impl, op, ErrInvalid)
	}
	return nil
}

// rewrap decrypts items and seals them again under the newest key version
// with the same associated data (both implementations' Rewrap). The
// plaintexts exist only in this process's memory in between and are zeroed
// afterwards.
func rewrap(ctx context.Context, tenant string, items []Item,
	decrypt func(ctx context.Context, op, tenant string, items []Item) ([][]byte, error),
	encrypt func(ctx context.Context, op, tenant string, items []Item) ([]string, error)) ([]string, error) {
	const op = "rewrap"
	plaintexts, err := decrypt(ctx, op, tenant, items)
	if err != nil {
		return nil, err
	}
	defer zeroAll(plaintexts)
	fresh := make([]Item, len(items))
	for i, it := range items {
		fresh[i] = Item{AssociatedData: it.AssociatedData, Plaintext: plaintexts[i]}
	}
	return encrypt(ctx, op, tenant, fresh)
}
