// Package ratelimit is a request budget shared by every replica through
// Redis: the gateway paces each upstream account with it (FleetUp's budget:
// fleetup.DefaultAccountLimit), and the authorizer (internal/authz) limits
// callers per principal, session and tenant. The state is one Redis key per
// account holding a GCRA theoretical arrival time, updated atomically by a
// Lua script from github.com/go-redis/redis_rate, so all replicas draw on
// one budget and a replica that restarts loses nothing.
//
// It knows no provider and no caller: budgets are named by their users.
// Account names must not be secrets: they appear in Redis key names and
// errors.
//
// Key layout (redis_rate adds its own "rate:" in front):
//
//	rate:<prefix>:<account>   GCRA state, expires when the budget is full again
//
// Hold writes the same state (see holdScript), so an upstream's "wait"
// (HTTP 429 Retry-After) closes the account's budget on every replica.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// Limit is Rate events per Period, of which up to Burst may come at once.
type Limit struct {
	Rate   int
	Period time.Duration
	Burst  int
}

// PerSecond is rate events a second with the given burst.
func PerSecond(rate, burst int) Limit {
	return Limit{Rate: rate, Period: time.Second, Burst: burst}
}

func (l Limit) validate() error {
	if l.Rate <= 0 || l.Period <= 0 || l.Burst <= 0 {
		return fmt.Errorf("%w: %d per %s, burst %d", ErrInvalidLimit, l.Rate, l.Period, l.Burst)
	}
	return nil
}

var (
	// ErrInvalidLimit means a Limit with a non-positive field.
	ErrInvalidLimit = errors.New("ratelimit: invalid limit")
	// ErrLimited means no slot is free in time. Errors wrapping it are
	// *LimitedError and carry how long to wait, for a RetryInfo.
	ErrLimited = errors.New("ratelimit: rate limit exceeded")
)

// LimitedError reports that the account's budget is spent.
type LimitedError struct {
	Account    string
	RetryAfter time.Duration
}

func (e *LimitedError) Error() string {
	return fmt.Sprintf("ratelimit: account %q is over its rate limit; retry after %s", e.Account, e.RetryAfter)
}

// Unwrap makes errors.Is(err, ErrLimited) hold.
func (e *LimitedError) Unwrap() error { return ErrLimited }

// Limiter is a rate limiter shared through Redis. It is safe for concurrent
// use.
type Limiter struct {
	rl     *redis_rate.Limiter
	client redis.UniversalClient
	prefix string
	// leases holds, per account, slots this replica took from Redis in one
	// round trip and has not spent yet (see leaseSize).
	leases sync.Map // account → *lease
}

// leaseTTL is how long leased slots stay usable. Slots not spent by then
// are lost to the shared budget, so it is short.
const leaseTTL = 50 * time.Millisecond

// lease is a handful of slots taken at once.
type lease struct {
	mu      sync.Mutex
	slots   int
	expires time.Time
}

// leaseSize is how many slots to take per Redis round trip: a leaseTTL's
// worth of the budget, within the burst. For FleetUp's real budget (about
// 1/s) that is 1 — a round trip per request, exactly as before; only
// accounts with large budgets lease, and save the round trip per request.
func leaseSize(limit Limit) int {
	n := int(float64(limit.Rate) * float64(leaseTTL) / float64(limit.Period))
	return min(n, limit.Burst)
}

// fromLease spends a leased slot of account, if one is left.
func (l *Limiter) fromLease(account string) bool {
	v, ok := l.leases.Load(account)
	if !ok {
		return false
	}
	ls := v.(*lease)
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.slots > 0 && time.Now().Before(ls.expires) {
		ls.slots--
		return true
	}
	return false
}

// keepLease stores the rest of a lease just taken.
func (l *Limiter) keepLease(account string, slots int) {
	v, _ := l.leases.LoadOrStore(account, &lease{})
	ls := v.(*lease)
	ls.mu.Lock()
	ls.slots, ls.expires = slots, time.Now().Add(leaseTTL)
	ls.mu.Unlock()
}

// New returns a Limiter keeping its state in client under prefix, which
// names the budgets' owner (e.g. "fb:gw:rl"): two deployments sharing a
// Redis share budgets exactly when their prefixes are equal.
func New(client redis.UniversalClient, prefix string) *Limiter {
	return &Limiter{rl: redis_rate.NewLimiter(client), client: client, prefix: prefix}
}

// Allow takes a slot for account if one is free now. If not, it reports
// how long until one is, and takes nothing.
func (l *Limiter) Allow(ctx context.Context, account string, limit Limit) (allowed bool, retryAfter time.Duration, err error) {
	if account == "" {
		return false, 0, errors.New("ratelimit: empty account")
	}
	if err := limit.validate(); err != nil {
		return false, 0, err
	}
	if l.fromLease(account) {
		return true, 0, nil
	}
	rl := redis_rate.Limit{Rate: limit.Rate, Period: limit.Period, Burst: limit.Burst}
	if n := leaseSize(limit); n > 1 {
		res, err := l.rl.AllowN(ctx, l.prefix+":"+account, rl, n)
		if err != nil {
			return false, 0, fmt.Errorf("ratelimit: account %q: %w", account, err)
		}
		if res.Allowed == n {
			l.keepLease(account, n-1)
			return true, 0, nil
		}
		// Not a whole lease left in the budget: fall back to one slot.
	}
	res, err := l.rl.Allow(ctx, l.prefix+":"+account, rl)
	if err != nil {
		return false, 0, fmt.Errorf("ratelimit: account %q: %w", account, err)
	}
	if res.Allowed > 0 {
		return true, 0, nil
	}
	return false, max(res.RetryAfter, 0), nil
}

// Wait blocks until account has a slot and takes it. If ctx's deadline
// comes before the next free slot, Wait returns a *LimitedError at once
// instead of sleeping in vain; if ctx ends while waiting, its error.
func (l *Limiter) Wait(ctx context.Context, account string, limit Limit) error {
	for {
		allowed, retryAfter, err := l.Allow(ctx, account, limit)
		if err != nil || allowed {
			return err
		}
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < retryAfter {
			return &LimitedError{Account: account, RetryAfter: retryAfter}
		}
		// A little jitter, so waiters on many replicas do not all come
		// back in the same millisecond and race for one slot.
		t := time.NewTimer(retryAfter + rand.N(retryAfter/10+time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("ratelimit: waiting for account %q: %w", account, ctx.Err())
		case <-t.C:
		}
	}
}

// holdScript moves an account's GCRA state so that its next slot is free
// no sooner than ARGV[4] seconds from now, and never brings a later one
// forward. It writes the key and the encoding redis_rate's allowN script
// reads — the theoretical arrival time (TAT) in seconds since 2017-01-01,
// Redis's own clock — so Allow and Wait honour it with no extra round trip.
// allowN grants a slot when TAT + emission interval - burst offset <= now;
// TestHoldClosesTheBudget fails if redis_rate ever changes that.
var holdScript = redis.NewScript(`
redis.replicate_commands()

local key = KEYS[1]
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])

local emission_interval = period / rate
local burst_offset = emission_interval * burst

local jan_1_2017 = 1483228800
local now = redis.call("TIME")
now = (now[1] - jan_1_2017) + (now[2] / 1000000)

local held = now + hold + burst_offset - emission_interval
local tat = redis.call("GET", key)
if tat then
  tat = tonumber(tat)
else
  tat = 0
end
if tat < held then
  redis.call("SET", key, held, "EX", math.ceil(held - now))
end
return 0
`)

// Hold hands out no slot of account for d, on every replica sharing the
// Redis: the upstream asked to wait (an HTTP 429's Retry-After). Waiters
// are told to come back when the hold ends; a longer hold already in place
// stays. Slots this replica leased are dropped.
func (l *Limiter) Hold(ctx context.Context, account string, limit Limit, d time.Duration) error {
	if account == "" {
		return errors.New("ratelimit: empty account")
	}
	if err := limit.validate(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	l.leases.Delete(account)
	args := []any{limit.Burst, limit.Rate, limit.Period.Seconds(), d.Seconds()}
	if err := holdScript.Run(ctx, l.client, []string{"rate:" + l.prefix + ":" + account}, args...).Err(); err != nil {
		return fmt.Errorf("ratelimit: hold account %q: %w", account, err)
	}
	return nil
}
