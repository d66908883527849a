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
	"strings"
	"sync"

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

// dataKeys gets, creates and remembers the per-tenant data keys.
type dataKeys struct {
	tr     transit.Transit
	client redis.UniversalClient
	prefix string

	mu   sync.Mutex
	keys map[string]*dataKey // tenant → the key this process uses

	// loads makes concurrent requests for one tenant share a single
	// Redis read and transit unwrap.
	loads singleflight.Group
}

func newDataKeys(client redis.UniversalClient, tr transit.Transit, prefix string) *dataKeys {
	return &dataKeys{tr: tr, client: client, prefix: prefix, keys: make(map[string]*dataKey)}
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

// load reads tenant's wrapped key from Redis (creating it if there is none),
// unwraps it and makes it the process's key for tenant.
func (d *dataKeys) load(ctx context.Context, tenant string) (*dataKey, error) {
	v, err, _ := d.loads.Do(tenant, func() (any, error) {
		k, err := d.fetch(ctx, tenant, true)
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

// fetch reads and unwraps tenant's data key; if Redis has none and mayCreate
// is set, it creates one.
func (d *dataKeys) fetch(ctx context.Context, tenant string, mayCreate bool) (*dataKey, error) {
	name := tenantDataKeyName(d.prefix, tenant)
	wrapped, err := d.client.Get(ctx, name).Result()
	switch {
	case errors.Is(err, redis.Nil) && mayCreate:
		return d.create(ctx, tenant, name)
	case errors.Is(err, redis.Nil):
		return nil, fmt.Errorf("tokencache: data key of tenant %q vanished while it was being created", tenant)
	case err != nil:
		return nil, fmt.Errorf("tokencache: read data key of tenant %q: %w", tenant, err)
	}
	// The key may just not have changed; then skip the transit round trip.
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
		return d.fetch(ctx, tenant, false)
	}
	return newDataKey(dk.Wrapped, dk.Plaintext)
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
