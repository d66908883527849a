package transit

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"sync"
)

// keyringPrefix starts every Keyring ciphertext. It differs from Vault's
// "vault:" on purpose, so a dev ciphertext that reaches a production
// database is recognisable at a glance and never mistaken for Vault's.
const keyringPrefix = "fbdev"

// Salts separate the two uses of a master key, so that no tenant name can
// make an encryption key equal to the HMAC key.
var (
	keyringEncryptSalt = []byte("fleetbroker dev keyring: tenant encryption key")
	keyringHMACSalt    = []byte("fleetbroker dev keyring: hmac key")
)

// Keyring is a local, in-memory imitation of Vault transit.
//
// FOR `fleetbroker dev` ONLY. NEVER USE IT IN PRODUCTION. Its master keys
// are random bytes in process memory: they are not backed by an HSM or
// Vault's barrier, not audited, not access-controlled, and lost when the
// process exits, which makes every ciphertext it produced unreadable.
// Production uses Vault.
//
// It follows Vault's transit semantics so that dev behaves like production:
// one master key per version; per tenant an AES-256-GCM key derived with
// HKDF-SHA256 (info = tenant); each item's associated data bound into the
// GCM tag; versioned ciphertexts "fbdev:v<N>:<base64(nonce||ciphertext)>";
// rotation, rewrap, wrapped data keys and HMAC under the newest version.
type Keyring struct {
	mu sync.RWMutex
	// masters[i] is the master key of version i+1.
	masters [][]byte
}

var _ Rotatable = (*Keyring)(nil)

// NewKeyring returns a dev-only Keyring with one fresh random key version.
// See Keyring: never use it in production.
func NewKeyring() (*Keyring, error) {
	k := &Keyring{}
	if err := k.RotateKey(context.Background()); err != nil {
		return nil, err
	}
	return k, nil
}

// RotateKey adds a new random master key version; new ciphertexts and MACs
// use it, old ciphertexts keep decrypting.
func (k *Keyring) RotateKey(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dev keyring rotate key: %w: %w", ErrUnavailable, err)
	}
	master := make([]byte, 32)
	if _, err := rand.Read(master); err != nil {
		return fmt.Errorf("dev keyring rotate key: %w", err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.masters = append(k.masters, master)
	return nil
}

// Encrypt seals each item under tenant's key of the newest version.
func (k *Keyring) Encrypt(ctx context.Context, tenant string, items []Item) ([]string, error) {
	return k.encrypt(ctx, "encrypt", tenant, items)
}

// Decrypt opens each item; if any item fails, no plaintext is returned.
func (k *Keyring) Decrypt(ctx context.Context, tenant string, items []Item) ([][]byte, error) {
	return k.decrypt(ctx, "decrypt", tenant, items)
}

// Rewrap decrypts and re-encrypts each item under the newest version,
// keeping its associated data.
func (k *Keyring) Rewrap(ctx context.Context, tenant string, items []Item) ([]string, error) {
	return rewrap(ctx, tenant, items, k.decrypt, k.encrypt)
}

// GenerateDataKey returns a random 256-bit key and its wrapped form, bound
// to tenant (no associated data, as in Vault's datakey endpoint).
func (k *Keyring) GenerateDataKey(ctx context.Context, tenant string) (DataKey, error) {
	const op = "datakey"
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return DataKey{}, fmt.Errorf("dev keyring %s: %w", op, err)
	}
	wrapped, err := k.encrypt(ctx, op, tenant, []Item{{Plaintext: key}})
	if err != nil {
		return DataKey{}, err
	}
	return DataKey{Plaintext: key, Wrapped: wrapped[0]}, nil
}

// UnwrapDataKey opens a key made by GenerateDataKey for the same tenant.
func (k *Keyring) UnwrapDataKey(ctx context.Context, tenant string, wrapped string) ([]byte, error) {
	keys, err := k.decrypt(ctx, "unwrap datakey", tenant, []Item{{Ciphertext: wrapped}})
	if err != nil {
		return nil, err
	}
	return keys[0], nil
}

// HMAC returns HMAC-SHA256 of data under the newest version's HMAC key,
// which is shared by all tenants, as in Vault.
func (k *Keyring) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	const op = "hmac"
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("dev keyring %s: %w: %w", op, ErrUnavailable, err)
	}
	_, master := k.newest()
	key, err := hkdf.Key(sha256.New, master, keyringHMACSalt, "", 32)
	if err != nil {
		return nil, fmt.Errorf("dev keyring %s: derive key: %w", op, err)
	}
	mac := hmac.New(sha256.New, key)
	mac.Write(data)
	return mac.Sum(nil), nil
}

func (k *Keyring) encrypt(ctx context.Context, op, tenant string, items []Item) ([]string, error) {
	if err := k.check(ctx, op, tenant); err != nil {
		return nil, err
	}
	results, err := k.encryptEach(op, withTenant(tenant, items))
	if err != nil {
		return nil, err
	}
	return ciphertexts("dev keyring "+op, results)
}

func (k *Keyring) decrypt(ctx context.Context, op, tenant string, items []Item) ([][]byte, error) {
	if err := k.check(ctx, op, tenant); err != nil {
		return nil, err
	}
	return plaintexts("dev keyring "+op, k.decryptEach(withTenant(tenant, items)))
}

// EncryptEach encrypts items, each under its own tenant's key, and reports
// each item's outcome apart (Batcher).
func (k *Keyring) EncryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	const op = "encrypt"
	if err := k.checkEach(ctx, op, items); err != nil {
		return nil, err
	}
	return k.encryptEach(op, items)
}

// DecryptEach decrypts items, each under its own tenant's key, and reports
// each item's outcome apart (Batcher).
func (k *Keyring) DecryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	if err := k.checkEach(ctx, "decrypt", items); err != nil {
		return nil, err
	}
	return k.decryptEach(items), nil
}

// HMACEach computes the HMAC of each input, as HMAC does (Batcher).
func (k *Keyring) HMACEach(ctx context.Context, inputs [][]byte) ([]ItemResult, error) {
	out := make([]ItemResult, len(inputs))
	for i, in := range inputs {
		mac, err := k.HMAC(ctx, in)
		if err != nil {
			return nil, err
		}
		out[i].MAC = mac
	}
	return out, nil
}

// encryptEach seals each item under its tenant's key of the newest version,
// deriving each tenant's key once.
func (k *Keyring) encryptEach(op string, items []TenantItem) ([]ItemResult, error) {
	version, master := k.newest()
	aeads := map[string]cipher.AEAD{}
	out := make([]ItemResult, len(items))
	for i, it := range items {
		aead, ok := aeads[it.Tenant]
		if !ok {
			var err error
			if aead, err = tenantAEAD(master, it.Tenant); err != nil {
				return nil, fmt.Errorf("dev keyring %s: %w", op, err)
			}
			aeads[it.Tenant] = aead
		}
		nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(it.Plaintext)+aead.Overhead())
		if _, err := rand.Read(nonce); err != nil {
			return nil, fmt.Errorf("dev keyring %s: %w", op, err)
		}
		sealed := aead.Seal(nonce, nonce, it.Plaintext, it.AssociatedData)
		out[i].Ciphertext = fmt.Sprintf("%s:v%d:%s", keyringPrefix, version, base64.StdEncoding.EncodeToString(sealed))
	}
	return out, nil
}

// decryptEach opens each item, deriving each tenant's key of each version
// once.
func (k *Keyring) decryptEach(items []TenantItem) []ItemResult {
	aeads := map[tenantVersion]cipher.AEAD{}
	out := make([]ItemResult, len(items))
	for i, it := range items {
		out[i].Plaintext, out[i].Err = k.open(aeads, it)
	}
	return out
}

type tenantVersion struct {
	tenant  string
	version int
}

// open decrypts one item. Every failure is ErrDecrypt, without detail: the
// caller can do nothing different for a malformed, tampered or foreign
// ciphertext.
func (k *Keyring) open(aeads map[tenantVersion]cipher.AEAD, it TenantItem) ([]byte, error) {
	version, sealed, ok := parseKeyringCiphertext(it.Ciphertext)
	if !ok {
		return nil, ErrDecrypt
	}
	aead, ok := aeads[tenantVersion{it.Tenant, version}]
	if !ok {
		master := k.master(version)
		if master == nil {
			return nil, ErrDecrypt
		}
		var err error
		if aead, err = tenantAEAD(master, it.Tenant); err != nil {
			return nil, err
		}
		aeads[tenantVersion{it.Tenant, version}] = aead
	}
	if len(sealed) < aead.NonceSize()+aead.Overhead() {
		return nil, ErrDecrypt
	}
	nonce, ct := sealed[:aead.NonceSize()], sealed[aead.NonceSize():]
	pt, err := aead.Open(nil, nonce, ct, it.AssociatedData)
	if err != nil {
		return nil, ErrDecrypt
	}
	return pt, nil
}

func (k *Keyring) check(ctx context.Context, op, tenant string) error {
	if err := requireTenant("dev keyring", op, tenant); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dev keyring %s: %w: %w", op, ErrUnavailable, err)
	}
	return nil
}

func (k *Keyring) checkEach(ctx context.Context, op string, items []TenantItem) error {
	if err := requireTenants("dev keyring", op, items); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("dev keyring %s: %w: %w", op, ErrUnavailable, err)
	}
	return nil
}

func (k *Keyring) newest() (version int, master []byte) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.masters), k.masters[len(k.masters)-1]
}

// master returns the master key of version, or nil if there is none.
func (k *Keyring) master(version int) []byte {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if version < 1 || version > len(k.masters) {
		return nil
	}
	return k.masters[version-1]
}

// tenantAEAD derives tenant's AES-256-GCM key from a master key.
func tenantAEAD(master []byte, tenant string) (cipher.AEAD, error) {
	key, err := hkdf.Key(sha256.New, master, keyringEncryptSalt, tenant, 32)
	if err != nil {
		return nil, fmt.Errorf("derive key: %w", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// parseKeyringCiphertext splits "fbdev:v<N>:<base64>".
func parseKeyringCiphertext(s string) (version int, sealed []byte, ok bool) {
	prefix, rest, ok := strings.Cut(s, ":")
	if !ok || prefix != keyringPrefix {
		return 0, nil, false
	}
	v, b64body, ok := strings.Cut(rest, ":")
	if !ok || !strings.HasPrefix(v, "v") {
		return 0, nil, false
	}
	version, err := strconv.Atoi(v[1:])
	if err != nil || version < 1 {
		return 0, nil, false
	}
	sealed, err = base64.StdEncoding.DecodeString(b64body)
	if err != nil {
		return 0, nil, false
	}
	return version, sealed, true
}
