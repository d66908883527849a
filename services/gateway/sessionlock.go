package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// Wialon's message loader (messages/load_interval … unload, and the trips
// built on it) is state of the session: two loads on one shared session at
// once, from any replica, would read each other's messages. loaderLock
// serializes them across replicas with a Redis lock per shared session.
type loaderLock struct {
	client redis.UniversalClient
	prefix string
	ttl    time.Duration
}

// releaseIfOwner deletes the lock only if it is still ours, so a holder
// whose lock expired cannot release its successor's.
var releaseIfOwner = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

// name shares the token's hash tag, so it lives in the tenant's slot.
func (l *loaderLock) name(key tokencache.Key) string {
	return fmt.Sprintf("%s:{%s}:loader:%s:%d", l.prefix, key.Tenant, key.Credential, key.Version)
}

// lock waits (within ctx) until this caller holds the loader of key's
// session and returns the release function.
func (l *loaderLock) lock(ctx context.Context, key tokencache.Key) (func(), error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	value, name := hex.EncodeToString(b), l.name(key)
	delay := 10 * time.Millisecond
	for {
		ok, err := l.client.SetNX(ctx, name, value, l.ttl).Result()
		if err != nil {
			return nil, fmt.Errorf("wialon loader lock: %w", err)
		}
		if ok {
			return func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
				defer cancel()
				_ = releaseIfOwner.Run(ctx, l.client, []string{name}, value).Err() // else it expires
			}, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay + mrand.N(delay)):
		}
		delay = min(delay*2, 200*time.Millisecond)
	}
}
