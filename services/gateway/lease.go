package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// sessionLeases are counting semaphores of a shared upstream session,
// shared by every replica through Redis (provider.Conn.Lease): Wialon
// serves at most 10 requests and 3 heavy ones at once per session, and one
// message load at a time; a gateway fleet sharing one session stays within
// those limits only if every replica counts in one place.
//
// Slots are granted first come, first served: a waiter takes a ticket and
// is granted a slot when fewer tickets are ahead of it than slots are
// free, so a burst of callers is served in order instead of by whoever
// polls luckiest. Slots and waiting tickets carry an expiry the holder
// renews while it is alive; one whose replica died is dropped by the next
// caller once it expired. Redis's clock (TIME) judges expiry, so replicas'
// clocks need not agree.
//
// Key layout (the tenant is the hash tag, so the four keys share a slot):
//
//	<prefix>:{<tenant>}:lease:<name>:<credential>:<generation>:h  sorted set: holders, score = expiry (ms)
//	<prefix>:{<tenant>}:lease:<name>:<credential>:<generation>:q  sorted set: waiters, score = ticket
//	<prefix>:{<tenant>}:lease:<name>:<credential>:<generation>:w  sorted set: waiters, score = expiry (ms)
//	<prefix>:{<tenant>}:lease:<name>:<credential>:<generation>:n  ticket counter
type sessionLeases struct {
	client redis.UniversalClient
	prefix string
	logger *slog.Logger
}

// leaseAcquire grants ARGV[1] a slot of KEYS (holders, queue, waiter
// expiry, ticket counter) if fewer than ARGV[2] slots are held and it is
// among the first waiters; ARGV[3] is the TTL in ms. Reply {1, 0} when
// granted, else {0, waiters ahead}. With nobody waiting and a slot free
// (every call on a quiet session) it grants without touching the queue:
// half the commands, which the benchmark's profile showed as most of the
// gateway's Redis CPU per Wialon call.
var leaseAcquire = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local keep = ttl * 4
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], id) then
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {1, 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, m in ipairs(dead) do redis.call('ZREM', KEYS[2], m) end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
end
local free = limit - redis.call('ZCARD', KEYS[1])
if free > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {1, 0}
end
if not redis.call('ZSCORE', KEYS[2], id) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), id)
  redis.call('PEXPIRE', KEYS[4], keep)
end
local rank = redis.call('ZRANK', KEYS[2], id)
if rank < free then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], now + ttl, id)
  redis.call('PEXPIRE', KEYS[1], keep)
  return {1, 0}
end
redis.call('ZADD', KEYS[3], now + ttl, id)
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
return {0, rank - free + 1}
`)

// leaseRenew extends ARGV[1]'s slot in KEYS[1] by ARGV[2] ms if it still
// holds it. Reply 1 if it did, 0 if the slot was lost.
var leaseRenew = redis.NewScript(`
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return 1
`)

const (
	// leasePollMin and leasePollMax bound a waiter's pause between polls;
	// it grows with the waiters ahead of it.
	leasePollMin = 5 * time.Millisecond
	leasePollMax = 100 * time.Millisecond
	// leaseCleanupTimeout bounds a release after the caller's ctx ended.
	leaseCleanupTimeout = 2 * time.Second
)

func (l *sessionLeases) keys(session tokencache.Key, name string) []string {
	base := fmt.Sprintf("%s:{%s}:lease:%s:%s:%s", l.prefix, session.Tenant, name, session.Credential, session.Generation)
	return []string{base + ":h", base + ":q", base + ":w", base + ":n"}
}

// lease waits (within ctx) for one of limit slots named name of session
// and returns its release. The slot is renewed every ttl/3 until released.
func (l *sessionLeases) lease(ctx context.Context, session tokencache.Key, name string, limit int, ttl time.Duration) (func(), error) {
	if name == "" || strings.ContainsAny(name, ":{}") || limit < 1 || ttl < 3*time.Millisecond {
		return nil, fmt.Errorf("session lease: invalid name %q, limit %d or ttl %s", name, limit, ttl)
	}
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	id, keys := hex.EncodeToString(b), l.keys(session, name)
	ttlMs := ttl.Milliseconds()
	for {
		res, err := leaseAcquire.Run(ctx, l.client, keys, id, limit, ttlMs).Int64Slice()
		if err != nil {
			l.forget(ctx, keys, id)
			return nil, fmt.Errorf("session lease %s: %w", name, err)
		}
		if res[0] == 1 {
			return l.hold(ctx, keys, id, name, ttl), nil
		}
		pause := min(max(time.Duration(res[1])*leasePollMin, leasePollMin), leasePollMax)
		t := time.NewTimer(pause/2 + mrand.N(pause))
		select {
		case <-ctx.Done():
			t.Stop()
			l.forget(ctx, keys, id)
			return nil, fmt.Errorf("session lease %s: waiting behind %d: %w", name, res[1], ctx.Err())
		case <-t.C:
		}
	}
}

// hold renews the slot until the returned release is called, which frees it.
func (l *sessionLeases) hold(ctx context.Context, keys []string, id, name string, ttl time.Duration) func() {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(ttl / 3)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				rctx, cancel := context.WithTimeout(context.Background(), ttl/3)
				kept, err := leaseRenew.Run(rctx, l.client, keys[:1], id, ttl.Milliseconds()).Int()
				cancel()
				if err == nil && kept == 0 {
					l.logger.Warn("session lease lost before release (renewal came too late)", "lease", name)
					return
				}
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseCleanupTimeout)
		defer cancel()
		_ = l.client.ZRem(rctx, keys[0], id).Err() // else it expires after ttl
	}
}

// forget takes a waiter out of the queue (it gave up or failed).
func (l *sessionLeases) forget(ctx context.Context, keys []string, id string) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseCleanupTimeout)
	defer cancel()
	_, _ = l.client.TxPipelined(rctx, func(p redis.Pipeliner) error {
		p.ZRem(rctx, keys[1], id)
		p.ZRem(rctx, keys[2], id)
		return nil
	})
}
