package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// sessionLock is the cross-replica lock a provider may hold on state of a
// shared upstream session (provider.Conn.Lock): Wialon's message loader
// (messages/load_interval … unload, and the trips built on it) is such
// state — two loads on one shared session at once, from any replica, would
// read each other's messages.
type sessionLock struct {
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

// key names the lock; it shares the token's hash tag, so it lives in the
// tenant's slot.
func (l *sessionLock) key(session tokencache.Key, name string) string {
	return fmt.Sprintf("%s:{%s}:lock:%s:%s:%s", l.prefix, session.Tenant, name, session.Credential, session.Generation)
}

// lock waits (within ctx) until this caller holds lock name of session and
// returns the release function.
func (l *sessionLock) lock(ctx context.Context, session tokencache.Key, name string) (func(), error) {
	if name == "" || strings.ContainsAny(name, ":{}") {
		return nil, fmt.Errorf("session lock: invalid name %q", name)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	value, key := hex.EncodeToString(b), l.key(session, name)
	delay := 10 * time.Millisecond
	for {
		ok, err := l.client.SetNX(ctx, key, value, l.ttl).Result()
		if err != nil {
			return nil, fmt.Errorf("session lock %s: %w", name, err)
		}
		if ok {
			return func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
				defer cancel()
				_ = releaseIfOwner.Run(ctx, l.client, []string{key}, value).Err() // else it expires
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
