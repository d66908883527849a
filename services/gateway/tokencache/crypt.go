package tokencache

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// sealedFormat starts every stored value, so that a later format can be
// told apart during a rolling upgrade.
const sealedFormat = "v1"

// errUndecryptable means a stored value did not open: tampered, copied from
// another key name, or sealed under a data key this tenant no longer has.
// The cache treats such a value as a miss and mints over it; the error never
// leaves the package.
var errUndecryptable = errors.New("tokencache: stored token does not decrypt")

// dataKey is one tenant's unwrapped data key, kept only in memory.
type dataKey struct {
	// id fingerprints the wrapped key and is written into every value
	// sealed with it, so a reader knows whether it holds the right key.
	id   string
	aead cipher.AEAD
}

// minReplaceInterval is the least time between two replacements of one
// tenant's data key by one process. One replacement repairs a lost transit
// key; a replica pointed at the wrong Vault would otherwise replace, and
// make every replica mint again, on every call.
const minReplaceInterval = time.Minute

// dataKeys gets, creates and remembers the per-tenant data keys.
type dataKeys struct {
	tr     transit.Transit
	client redis.UniversalClient
	prefix string
	log    *slog.Logger
	// replaced counts data keys replaced because they no longer unwrapped.
	replaced atomic.Int64

	mu         sync.Mutex
	keys       map[string]*dataKey  // tenant → the key this process uses
	replacedAt map[string]time.Time // tenant → when this process last replaced its key

	// loads makes concurrent requests for one tenant share a single
	// Redis read and transit unwrap.
	loads singleflight.Group
}

func newDataKeys(client redis.UniversalClient, tr transit.Transit, prefix string, log *slog.Logger) *dataKeys {
	return &dataKeys{tr: tr, client: client, prefix: prefix, log: log,
		keys: make(map[string]*dataKey), replacedAt: make(map[string]time.Time)}
}

// current returns the data key to seal new values of tenant with.
func (d *dataKeys) current(ctx context.Context, tenant string) (*dataKey, error) {
	if k := d.cached(tenant); k != nil {
		return k, nil
	}
	return d.load(ctx, tenant)
}

// byID returns tenant's data key with the given id. If the process holds
// another one, the key in Redis was replaced (deleted, evicted, flushed), so
// it is loaded again; if that one does not match either, the value is
// undecryptable.
func (d *dataKeys) byID(ctx context.Context, tenant, id string) (*dataKey, error) {
	if k := d.cached(tenant); k != nil && k.id == id {
		return k, nil
	}
	k, err := d.load(ctx, tenant)
	if err != nil {
		return nil, err
	}
	if k.id != id {
		return nil, errUndecryptable
	}
	return k, nil
}

func (d *dataKeys) cached(tenant string) *dataKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.keys[tenant]
}

// load reads tenant's wrapped key from Redis (creating it if there is none,
// replacing it if it no longer unwraps), unwraps it and makes it the
// process's key for tenant.
func (d *dataKeys) load(ctx context.Context, tenant string) (*dataKey, error) {
	v, err, _ := d.loads.Do(tenant, func() (any, error) {
		k, err := d.fetch(ctx, tenant)
		if err != nil {
			return nil, err
		}
		d.mu.Lock()
		d.keys[tenant] = k
		d.mu.Unlock()
		return k, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*dataKey), nil
}

// fetch reads and unwraps tenant's data key. If Redis has none it creates
// one; if the one in Redis does not unwrap it replaces it.
func (d *dataKeys) fetch(ctx context.Context, tenant string) (*dataKey, error) {
	name := tenantDataKeyName(d.prefix, tenant)
	wrapped, err := d.client.Get(ctx, name).Result()
	switch {
	case errors.Is(err, redis.Nil):
		return d.create(ctx, tenant, name)
	case err != nil:
		return nil, fmt.Errorf("tokencache: read data key of tenant %q: %w", tenant, err)
	}
	k, err := d.unwrap(ctx, tenant, wrapped)
	if errors.Is(err, transit.ErrDecrypt) {
		return d.replace(ctx, tenant, name, wrapped, err)
	}
	return k, err
}

// fetchExisting reads and unwraps the data key another replica has just
// stored; it neither creates nor replaces one, so two replicas can never
// take turns replacing each other's key within one call.
func (d *dataKeys) fetchExisting(ctx context.Context, tenant, name string) (*dataKey, error) {
	wrapped, err := d.client.Get(ctx, name).Result()
	switch {
	case errors.Is(err, redis.Nil):
		return nil, fmt.Errorf("tokencache: data key of tenant %q vanished while it was being stored", tenant)
	case err != nil:
		return nil, fmt.Errorf("tokencache: read data key of tenant %q: %w", tenant, err)
	}
	return d.unwrap(ctx, tenant, wrapped)
}

// unwrap turns a wrapped data key into a dataKey, without a transit call
// if it is the one this process already holds.
func (d *dataKeys) unwrap(ctx context.Context, tenant, wrapped string) (*dataKey, error) {
	if k := d.cached(tenant); k != nil && k.id == wrappedID(wrapped) {
		return k, nil
	}
	plain, err := d.tr.UnwrapDataKey(ctx, tenant, wrapped)
	if err != nil {
		return nil, fmt.Errorf("tokencache: unwrap data key of tenant %q: %w", tenant, err)
	}
	return newDataKey(wrapped, plain)
}

// create makes a data key and offers it with SET NX. Only one replica's key
// can win; a loser discards its own and uses the winner's, so every replica
// seals with the same key.
func (d *dataKeys) create(ctx context.Context, tenant, name string) (*dataKey, error) {
	dk, err := d.tr.GenerateDataKey(ctx, tenant)
	if err != nil {
		return nil, fmt.Errorf("tokencache: generate data key for tenant %q: %w", tenant, err)
	}
	// No TTL: the key must outlive every token sealed with it.
	won, err := d.client.SetNX(ctx, name, dk.Wrapped, 0).Result()
	if err != nil {
		clear(dk.Plaintext)
		return nil, fmt.Errorf("tokencache: store data key of tenant %q: %w", tenant, err)
	}
	if !won {
		clear(dk.Plaintext)
		return d.fetchExisting(ctx, tenant, name)
	}
	return newDataKey(dk.Wrapped, dk.Plaintext)
}

// compareAndSwap sets KEYS[1] to ARGV[2] only if it still holds ARGV[1].
var compareAndSwap = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
`)

// replace swaps bad, a wrapped data key that transit no longer unwraps
// (unwrapErr), for a new one. That happens when the transit key it was
// wrapped with is gone — Vault restored without it, a dev server
// restarted, the key recreated — or when someone planted another tenant's
// key. Without it the tenant's every call would fail until someone deleted
// the key from Redis by hand.
//
// No token is ever opened with the wrong key: each sealed value names the
// id of the key that sealed it, so values sealed with bad read as misses
// and are minted again (one upstream login per account and token kind).
//
// The swap is a compare-and-set on the value that failed, so of several
// replicas failing at once exactly one replaces it and the others use the
// winner's key. A process replaces a tenant's key at most once per
// minReplaceInterval.
func (d *dataKeys) replace(ctx context.Context, tenant, name, bad string, unwrapErr error) (*dataKey, error) {
	if !d.mayReplace(tenant) {
		return nil, fmt.Errorf("%w (replaced less than %s ago; not again yet)", unwrapErr, minReplaceInterval)
	}
	dk, err := d.tr.GenerateDataKey(ctx, tenant)
	if err != nil {
		return nil, fmt.Errorf("tokencache: replace data key of tenant %q: %w", tenant, err)
	}
	swapped, err := compareAndSwap.Run(ctx, d.client, []string{name}, bad, dk.Wrapped).Int()
	if err != nil {
		clear(dk.Plaintext)
		return nil, fmt.Errorf("tokencache: store data key of tenant %q: %w", tenant, err)
	}
	if swapped == 0 {
		clear(dk.Plaintext)
		return d.fetchExisting(ctx, tenant, name)
	}
	d.replaced.Add(1)
	d.log.WarnContext(ctx, "tokencache: the tenant's data key no longer unwraps (transit key lost or replaced?); "+
		"replaced it, cached upstream tokens will be minted again", slog.String("tenant", tenant))
	return newDataKey(dk.Wrapped, dk.Plaintext)
}

// mayReplace reports whether this process may replace tenant's data key
// now, and if so records that it does.
func (d *dataKeys) mayReplace(tenant string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if last, ok := d.replacedAt[tenant]; ok && time.Since(last) < minReplaceInterval {
		return false
	}
	d.replacedAt[tenant] = time.Now()
	return true
}

// newDataKey builds the cipher and wipes the caller's copy of the key
// bytes; the AES key schedule keeps its own.
func newDataKey(wrapped string, plain []byte) (*dataKey, error) {
	defer clear(plain)
	block, err := aes.NewCipher(plain)
	if err != nil {
		return nil, fmt.Errorf("tokencache: data key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("tokencache: data key: %w", err)
	}
	return &dataKey{id: wrappedID(wrapped), aead: aead}, nil
}

// wrappedID fingerprints a wrapped data key. It is public information (the
// wrapped key itself sits in Redis), so a plain hash is enough.
func wrappedID(wrapped string) string {
	sum := sha256.Sum256([]byte(wrapped))
	return hex.EncodeToString(sum[:8])
}

// seal encrypts token for the Redis key name: "v1:<key id>:<base64(nonce||ciphertext)>".
// The key name is the associated data, binding the value to where it is stored.
func seal(k *dataKey, name, token string) (string, error) {
	nonce := make([]byte, k.aead.NonceSize(), k.aead.NonceSize()+len(token)+k.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return "", fmt.Errorf("tokencache: nonce: %w", err)
	}
	sealed := k.aead.Seal(nonce, nonce, []byte(token), []byte(name))
	return sealedFormat + ":" + k.id + ":" + base64.RawStdEncoding.EncodeToString(sealed), nil
}

// parseSealed splits a stored value into its data key id and sealed bytes.
func parseSealed(value string) (id string, sealed []byte, err error) {
	format, rest, ok1 := strings.Cut(value, ":")
	id, body, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 || format != sealedFormat {
		return "", nil, errUndecryptable
	}
	sealed, err = base64.RawStdEncoding.DecodeString(body)
	if err != nil {
		return "", nil, errUndecryptable
	}
	return id, sealed, nil
}

// open decrypts a value sealed for the Redis key name.
func open(k *dataKey, name string, sealed []byte) (string, error) {
	n := k.aead.NonceSize()
	if len(sealed) < n {
		return "", errUndecryptable
	}
	plain, err := k.aead.Open(nil, sealed[:n], sealed[n:], []byte(name))
	if err != nil {
		return "", errUndecryptable
	}
	return string(plain), nil
}
