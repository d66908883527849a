package transit

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/api"
)

// Defaults for VaultConfig fields left empty.
const (
	DefaultVaultMount   = "transit"
	DefaultVaultKey     = "fleetbroker"
	DefaultVaultTimeout = 5 * time.Second
)

// VaultConfig says where Vault is, how to log in and which transit key to
// use.
type VaultConfig struct {
	// Addr is Vault's address, e.g. "https://vault.internal:8200".
	Addr string
	// CACert is a PEM file with the CA certificate(s) that Vault's TLS
	// certificate must chain to, instead of the system's roots; empty
	// means the system's roots (or $VAULT_CACERT).
	CACert string
	// TLSServerName, if set, is the name Vault's certificate is checked
	// against instead of the host in Addr.
	TLSServerName string
	// Namespace is the Vault Enterprise namespace (X-Vault-Namespace) of
	// every request, the login included; empty means none, whatever
	// $VAULT_NAMESPACE says.
	Namespace string
	// Auth says how to log in; the default is the token method with Token.
	Auth Auth
	// Token authenticates to Vault with the token auth method. If it is
	// renewable, it is renewed in the background until Close. Other auth
	// methods ignore it.
	Token string
	// Mount is the path the transit engine is mounted at; default "transit".
	Mount string
	// Key is the transit key's name; default "fleetbroker". It must be an
	// aes256-gcm96 key with derived=true (see EnsureKey).
	Key string
	// OnCall, if set, is told about every transit call when it ends (for
	// metrics): the operation, how long it took, and an error for a failed
	// call or an error status. It must not block.
	OnCall func(op string, took time.Duration, err error)
	// Timeout bounds every call to Vault, retries included; default 5s. A
	// login (unwrap, login) gets one Timeout in all.
	Timeout time.Duration
}

// Validate checks the settings without contacting Vault: an address, and
// what the auth method needs (NewVault checks them too).
func (c VaultConfig) Validate() error {
	if c.Addr == "" {
		return fmt.Errorf("vault transit: %w: address is required", ErrInvalid)
	}
	return c.Auth.validate(c.Token)
}

func (c VaultConfig) withDefaults() VaultConfig {
	c.Mount = strings.Trim(c.Mount, "/")
	if c.Mount == "" {
		c.Mount = DefaultVaultMount
	}
	if c.Key == "" {
		c.Key = DefaultVaultKey
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultVaultTimeout
	}
	c.Auth = c.Auth.withDefaults()
	return c
}

// Vault is the production Transit: HashiCorp Vault's transit engine, one
// named derived key, the tenant as derivation context and each item's
// associated data bound into the AES-GCM tag.
//
// Errors wrap ErrUnavailable, ErrDecrypt or ErrInvalid. Their text is built
// here and never includes Vault's response body, because Vault's messages
// (and partial batch results) can echo input or carry other items'
// plaintext.
type Vault struct {
	onCall  func(op string, took time.Duration, err error)
	client  *api.Client
	mount   string
	key     string
	timeout time.Duration
	logger  *slog.Logger

	method string    // Auth.Method
	login  loginFunc // nil for the token method
	logins atomic.Int64

	// The lifecycle goroutine (run): ctx ends it, done is closed when it
	// has returned, recheck asks it to check the token (noteRefusal).
	ctx       context.Context
	cancel    context.CancelFunc
	done      chan struct{}
	recheck   chan struct{}
	lastCheck time.Time // of the token, by the lifecycle goroutine only
	closeOnce sync.Once
}

var _ Rotatable = (*Vault)(nil)

// NewVault connects to Vault and authenticates as cfg.Auth says: it logs
// in (approle, kubernetes) or checks the token with a lookup-self call
// (token), so a wrong address, CA, role or token fails at startup rather
// than on first use. A background goroutine then keeps the token alive
// until Close: it renews it while Vault allows, and logs in again when it
// can no longer be renewed or Vault no longer accepts it (see Auth).
//
// Invalid settings, credentials Vault refuses and unreadable credential
// files are ErrInvalid; an unreachable Vault is ErrUnavailable.
//
// NewVault does not create the transit key: production creates it out of
// band (derived=true, type aes256-gcm96), and the service's policy needs no
// rights on keys/. Dev and test setups call EnsureKey.
func NewVault(ctx context.Context, cfg VaultConfig, logger *slog.Logger) (*Vault, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if logger == nil {
		logger = slog.Default()
	}
	client, err := newVaultClient(cfg)
	if err != nil {
		return nil, err
	}
	loopCtx, cancel := context.WithCancel(context.Background())
	v := &Vault{
		client:  client,
		mount:   cfg.Mount,
		key:     cfg.Key,
		timeout: cfg.Timeout,
		onCall:  cfg.OnCall,
		logger:  logger.With("component", "vault-transit"),
		method:  cfg.Auth.Method,
		login:   newLogin(cfg.Auth),
		ctx:     loopCtx,
		cancel:  cancel,
		done:    make(chan struct{}),
		recheck: make(chan struct{}, 1),
	}
	secret, err := v.authenticate(ctx, cfg.Token)
	if err != nil {
		cancel()
		return nil, err
	}
	go v.run(secret)
	return v, nil
}

// authenticate logs in with the configured method, or checks token, and
// returns the auth secret for the lifecycle goroutine.
func (v *Vault) authenticate(ctx context.Context, token string) (*api.Secret, error) {
	if v.login != nil {
		if token != "" {
			v.logger.Warn("a vault token is configured but not used", "method", v.method)
		}
		return v.logIn(ctx)
	}
	self, err := v.lookupSelf(ctx)
	if err != nil {
		return nil, err
	}
	if !self.Renewable && self.TTL > 0 {
		v.logger.Warn("vault token is not renewable; Vault calls fail once it expires", "ttl_seconds", self.TTL)
	}
	return &api.Secret{Auth: &api.SecretAuth{
		ClientToken:   token,
		Renewable:     self.Renewable,
		LeaseDuration: self.TTL,
	}}, nil
}

// Close stops the token's renewal and re-logins. It does not revoke the
// token. It is safe to call more than once and always returns nil.
func (v *Vault) Close() error {
	v.closeOnce.Do(func() {
		v.cancel()
		<-v.done
	})
	return nil
}

// tokenInfo is the part of auth/token/lookup-self that renewal needs.
type tokenInfo struct {
	Renewable bool `json:"renewable"`
	TTL       int  `json:"ttl"` // seconds; 0 for root tokens
}

func (v *Vault) lookupSelf(ctx context.Context) (tokenInfo, error) {
	var info tokenInfo
	err := v.call(ctx, "token lookup", http.MethodGet, "auth/token/lookup-self", nil, &info)
	return info, err
}

// Encrypt encrypts all items in one batch call.
func (v *Vault) Encrypt(ctx context.Context, tenant string, items []Item) ([]string, error) {
	return v.encrypt(ctx, "encrypt", tenant, items)
}

// Decrypt decrypts all items in one batch call. If any item fails, no
// plaintext is returned.
func (v *Vault) Decrypt(ctx context.Context, tenant string, items []Item) ([][]byte, error) {
	return v.decrypt(ctx, "decrypt", tenant, items)
}

// Rewrap re-encrypts items under the newest key version.
//
// Vault 1.21's transit/rewrap endpoint ignores associated_data: it decrypts
// without it (failing for every AAD-bound ciphertext) and would re-encrypt
// without it (dropping the binding). So Rewrap decrypts and re-encrypts in
// two batch calls instead; the plaintext exists only in this process's
// memory between the two calls and is zeroed afterwards.
func (v *Vault) Rewrap(ctx context.Context, tenant string, items []Item) ([]string, error) {
	return rewrap(ctx, tenant, items, v.decrypt, v.encrypt)
}

func (v *Vault) encrypt(ctx context.Context, op, tenant string, items []Item) ([]string, error) {
	if err := requireTenant("vault transit", op, tenant); err != nil {
		return nil, err
	}
	results, err := v.encryptEach(ctx, op, withTenant(tenant, items))
	if err != nil {
		return nil, err
	}
	return ciphertexts("vault transit "+op, results)
}

func (v *Vault) decrypt(ctx context.Context, op, tenant string, items []Item) ([][]byte, error) {
	if err := requireTenant("vault transit", op, tenant); err != nil {
		return nil, err
	}
	results, err := v.decryptEach(ctx, op, withTenant(tenant, items))
	if err != nil {
		return nil, err
	}
	return plaintexts("vault transit "+op, results)
}

// EncryptEach encrypts items, each under its own tenant's derived key, in
// one batch call, and reports each item's outcome apart (Batcher).
func (v *Vault) EncryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	const op = "encrypt"
	if err := requireTenants("vault transit", op, items); err != nil {
		return nil, err
	}
	return v.encryptEach(ctx, op, items)
}

// DecryptEach decrypts items, each under its own tenant's derived key, in
// one batch call, and reports each item's outcome apart (Batcher).
func (v *Vault) DecryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	const op = "decrypt"
	if err := requireTenants("vault transit", op, items); err != nil {
		return nil, err
	}
	return v.decryptEach(ctx, op, items)
}

// HMACEach computes the HMAC-SHA256 of each input under the key's newest
// version in one batch call (Batcher).
func (v *Vault) HMACEach(ctx context.Context, inputs [][]byte) ([]ItemResult, error) {
	const op = "hmac"
	if len(inputs) == 0 {
		return []ItemResult{}, nil
	}
	batch := make([]hmacItem, len(inputs))
	for i, in := range inputs {
		batch[i] = hmacItem{Input: b64(in)}
	}
	results, err := v.batch(ctx, op, v.path("hmac")+"/sha2-256", batch, len(batch))
	if err != nil {
		return nil, err
	}
	out := make([]ItemResult, len(results))
	for i, r := range results {
		if r.Error != "" || r.HMAC == "" {
			out[i].Err = ErrInvalid
			continue
		}
		mac, err := decodeVaultMAC(r.HMAC)
		if err != nil {
			out[i].Err = fmt.Errorf("malformed response: %w", ErrUnavailable)
			continue
		}
		out[i].MAC = mac
	}
	return out, nil
}

func (v *Vault) encryptEach(ctx context.Context, op string, items []TenantItem) ([]ItemResult, error) {
	if len(items) == 0 {
		return []ItemResult{}, nil
	}
	batch := make([]encryptItem, len(items))
	for i, it := range items {
		batch[i] = encryptItem{Plaintext: b64(it.Plaintext), Context: b64(it.Tenant), AssociatedData: b64(it.AssociatedData)}
	}
	results, err := v.batch(ctx, op, v.path("encrypt"), batch, len(batch))
	if err != nil {
		if isForbidden(err) && v.keyMissing(ctx) {
			return nil, fmt.Errorf("vault transit %s: %w", op, ErrKeyMissing)
		}
		return nil, err
	}
	out := make([]ItemResult, len(results))
	for i, r := range results {
		if r.Error != "" || r.Ciphertext == "" {
			// An item-level refusal (e.g. the key is not AEAD) is a
			// configuration problem, not a bad ciphertext.
			out[i].Err = ErrInvalid
			continue
		}
		out[i].Ciphertext = r.Ciphertext
	}
	return out, nil
}

func (v *Vault) decryptEach(ctx context.Context, op string, items []TenantItem) ([]ItemResult, error) {
	if len(items) == 0 {
		return []ItemResult{}, nil
	}
	batch := make([]decryptItem, len(items))
	for i, it := range items {
		batch[i] = decryptItem{Ciphertext: it.Ciphertext, Context: b64(it.Tenant), AssociatedData: b64(it.AssociatedData)}
	}
	results, err := v.batch(ctx, op, v.path("decrypt"), batch, len(batch))
	if err != nil {
		return nil, err
	}
	out := make([]ItemResult, len(results))
	for i, r := range results {
		if r.Error != "" {
			// Every per-item decrypt error means this ciphertext does not
			// open under this tenant and AAD: authentication failure,
			// malformed ciphertext, unknown version. Vault's message is
			// dropped on purpose: it may quote the input.
			out[i].Err = ErrDecrypt
			continue
		}
		pt, err := base64.StdEncoding.DecodeString(r.Plaintext)
		if err != nil {
			out[i].Err = fmt.Errorf("malformed response: %w", ErrUnavailable)
			continue
		}
		out[i].Plaintext = pt
	}
	return out, nil
}

// keyMissing tells whether the transit key is missing, after an encrypt
// was refused with 403. Vault treats an encrypt under a key that does not
// exist as creating it, which a least-privilege token (update only) may
// not do, so the refusal does not say whether the key is missing or the
// policy is wrong; a decrypt, which never creates, does.
func (v *Vault) keyMissing(ctx context.Context) bool {
	probe := []decryptItem{{Ciphertext: "vault:v1:" + b64(make([]byte, 28)), Context: b64(ProbeTenant)}}
	_, err := v.batch(ctx, "key check", v.path("decrypt"), probe, 1)
	return errors.Is(err, ErrKeyMissing)
}

// GenerateDataKey asks Vault for a wrapped 256-bit key bound to tenant
// (datakey/wrapped, so the policy needs no datakey/plaintext right) and
// unwraps it once to hand the caller both forms.
func (v *Vault) GenerateDataKey(ctx context.Context, tenant string) (DataKey, error) {
	const op = "datakey"
	if err := requireTenant("vault transit", op, tenant); err != nil {
		return DataKey{}, err
	}
	var resp struct {
		Ciphertext string `json:"ciphertext"`
	}
	body := map[string]any{"context": b64(tenant), "bits": 256}
	if err := v.call(ctx, op, http.MethodPost, v.path("datakey/wrapped"), body, &resp); err != nil {
		return DataKey{}, err
	}
	if resp.Ciphertext == "" {
		return DataKey{}, fmt.Errorf("vault transit %s: malformed response: %w", op, ErrUnavailable)
	}
	plain, err := v.UnwrapDataKey(ctx, tenant, resp.Ciphertext)
	if err != nil {
		return DataKey{}, err
	}
	return DataKey{Plaintext: plain, Wrapped: resp.Ciphertext}, nil
}

// UnwrapDataKey decrypts a key made by GenerateDataKey. Datakeys carry no
// associated data; the tenant is the only binding.
func (v *Vault) UnwrapDataKey(ctx context.Context, tenant string, wrapped string) ([]byte, error) {
	keys, err := v.decrypt(ctx, "unwrap datakey", tenant, []Item{{Ciphertext: wrapped}})
	if err != nil {
		return nil, err
	}
	return keys[0], nil
}

// HMAC returns the raw HMAC-SHA256 of data under the key's newest version.
// The key's HMAC key is not derived per tenant.
func (v *Vault) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	const op = "hmac"
	var resp struct {
		HMAC string `json:"hmac"`
	}
	body := map[string]any{"input": b64(data)}
	if err := v.call(ctx, op, http.MethodPost, v.path("hmac")+"/sha2-256", body, &resp); err != nil {
		return nil, err
	}
	mac, err := decodeVaultMAC(resp.HMAC)
	if err != nil {
		return nil, fmt.Errorf("vault transit %s: malformed response: %w", op, ErrUnavailable)
	}
	return mac, nil
}

// decodeVaultMAC turns "vault:v1:<base64>" into the raw MAC.
func decodeVaultMAC(s string) ([]byte, error) {
	parts := strings.SplitN(s, ":", 3)
	if len(parts) != 3 || parts[0] != "vault" || !strings.HasPrefix(parts[1], "v") {
		return nil, errors.New("not a vault hmac")
	}
	return base64.StdEncoding.DecodeString(parts[2])
}

// RotateKey adds a new key version; new ciphertexts and MACs use it.
func (v *Vault) RotateKey(ctx context.Context) error {
	return v.call(ctx, "rotate key", http.MethodPost, v.path("keys")+"/rotate", struct{}{}, nil)
}

// EnsureKey creates the transit key (aes256-gcm96, derived=true) if it is
// missing, and fails with ErrInvalid if a key of that name exists but is
// not derived or not AES-256-GCM. It is for tests and dev setups:
// production creates the key out of band, and the service's token should
// have no rights on <mount>/keys.
func (v *Vault) EnsureKey(ctx context.Context) error {
	const op = "ensure key"
	var key struct {
		Type    string `json:"type"`
		Derived bool   `json:"derived"`
	}
	err := v.call(ctx, op, http.MethodGet, v.path("keys"), nil, &key)
	var se *statusError
	switch {
	case errors.As(err, &se) && se.status == http.StatusNotFound:
		body := map[string]any{"type": "aes256-gcm96", "derived": true}
		return v.call(ctx, op, http.MethodPost, v.path("keys"), body, nil)
	case err != nil:
		return err
	case key.Type != "aes256-gcm96" || !key.Derived:
		return fmt.Errorf("vault transit %s: existing key is %s, derived=%t, want aes256-gcm96, derived=true: %w",
			op, key.Type, key.Derived, ErrInvalid)
	}
	return nil
}

func zeroAll(bufs [][]byte) {
	for _, b := range bufs {
		clear(b)
	}
}
