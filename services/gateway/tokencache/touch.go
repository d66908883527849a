package tokencache

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// compareAndExpire sets KEYS[1]'s TTL to ARGV[2] ms only if it still holds
// ARGV[1]. Reply: 1 if it did, else 0.
var compareAndExpire = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`)

// Touch sets how long e's token stays cached from now, if Redis still
// holds exactly that token: for upstream sessions that die after some idle
// time (Wialon: 5 minutes), the gateway keeps the cached session only as
// long as it can live idle after its last use. A token another replica
// has replaced is left alone. Touch does not extend the in-process copy
// (Options.LocalTTL), which is short anyway.
func (c *Cache) Touch(ctx context.Context, e Entry, ttl time.Duration) error {
	if e.stored == "" {
		return ErrZeroEntry
	}
	if ttl < time.Millisecond {
		return ErrBadTTL
	}
	n := c.names(e.key)
	if err := compareAndExpire.Run(ctx, c.client, []string{n.token}, e.stored, ttl.Milliseconds()).Err(); err != nil {
		return fmt.Errorf("tokencache: touch %s token: %w", e.key.Kind, err)
	}
	return nil
}
