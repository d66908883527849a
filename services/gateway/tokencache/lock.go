package tokencache

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"
)

// compareAndDelete deletes KEYS[1] only if it still holds ARGV[1], so a lock
// holder whose lock expired cannot release a successor's lock, and an
// Invalidate cannot drop a token minted after the failed one.
// Reply: 1 if deleted, else 0.
var compareAndDelete = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

// mintLock is one attempt at the cross-replica mint lock.
type mintLock struct {
	held bool
	// value is random and identifies this holder for release.
	value string
	// expires is when Redis drops the lock, measured conservatively from
	// before the SET was sent.
	expires time.Time
}

// tryLock takes the lock with SET NX PX, or reports that someone holds it.
func (c *Cache) tryLock(ctx context.Context, name string) (mintLock, error) {
	value, err := randomValue()
	if err != nil {
		return mintLock{}, err
	}
	expires := time.Now().Add(c.lockTTL)
	held, err := c.client.SetNX(ctx, name, value, c.lockTTL).Result()
	if err != nil {
		return mintLock{}, fmt.Errorf("tokencache: take mint lock: %w", err)
	}
	return mintLock{held: held, value: value, expires: expires}, nil
}

// unlock releases the lock if it is still ours. It runs even when ctx has
// ended, so waiters on other replicas need not sit out the whole LockTTL.
func (c *Cache) unlock(ctx context.Context, name string, lock mintLock) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if err := compareAndDelete.Run(ctx, c.client, []string{name}, lock.value).Err(); err != nil {
		// Harmless beyond a delay: the lock expires after LockTTL.
		c.log.WarnContext(ctx, "tokencache: release mint lock", slog.String("error", err.Error()))
	}
}

// waitForPeer polls while another replica holds the lock. It returns the
// token once it appears, found=false once the lock is gone without a token
// (the holder failed or died), or an error when ctx ends.
func (c *Cache) waitForPeer(ctx context.Context, key Key, n names) (Entry, bool, error) {
	delay := c.waitPoll
	for {
		if err := sleep(ctx, jitter(delay)); err != nil {
			return Entry{}, false, fmt.Errorf("tokencache: waiting for another replica to mint: %w", err)
		}
		delay = min(delay*3/2, maxPollFactor*c.waitPoll)
		// One round trip for both: the token and its lock share a slot.
		vals, err := c.client.MGet(ctx, n.token, n.lock).Result()
		if err != nil {
			return Entry{}, false, fmt.Errorf("tokencache: poll %s token: %w", key.Kind, err)
		}
		if stored, ok := vals[0].(string); ok {
			e, found, err := c.decode(ctx, key, n, stored)
			if err != nil || found {
				return e, found, err
			}
		}
		if vals[1] == nil {
			return Entry{}, false, nil
		}
	}
}

// jitter spreads d over [d/2, 3d/2), so waiters on many replicas do not
// poll in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + mrand.N(d)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func randomValue() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("tokencache: lock value: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
