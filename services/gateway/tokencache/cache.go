package tokencache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

const (
	defaultPrefix   = "fb:gw"
	defaultLockTTL  = 15 * time.Second
	defaultWaitPoll = 20 * time.Millisecond
	// maxPollFactor caps a waiter's backoff at this many WaitPolls.
	maxPollFactor = 10
	// flightRounds bounds a flight at this many LockTTLs: one wait for a
	// peer's lock to go, one mint of our own, and one spare handover.
	flightRounds = 3
	// cleanupTimeout bounds lock release after the caller's context ended.
	cleanupTimeout = 2 * time.Second
)

// ErrBadTTL means the mint function returned a TTL below one millisecond,
// the smallest Redis can store. The token is not cached.
var ErrBadTTL = errors.New("tokencache: mint returned a TTL below 1ms")

// ErrZeroEntry means Invalidate got an Entry that GetOrMint did not return.
var ErrZeroEntry = errors.New("tokencache: Invalidate needs an Entry returned by GetOrMint")

// MintFunc logs in upstream and returns a new token and how long it may be
// cached. The TTL should end a little before the upstream expiry (a FleetUp
// JWT lives 3600 s; a Wialon session idles out after ~5 minutes), so a token
// is never handed out in its last seconds. Its errors must not contain
// secrets: they reach callers unchanged (wrapped).
type MintFunc func(ctx context.Context) (token string, ttl time.Duration, err error)

// Options configure a Cache. The zero value is usable.
type Options struct {
	// Prefix starts every Redis key; default "fb:gw". It must not contain
	// '{' or '}', which would move the Cluster hash tag.
	Prefix string
	// LockTTL is how long a mint lock lives if its holder dies, and the
	// longest a mint may run; default 15s.
	LockTTL time.Duration
	// WaitPoll is the first delay between polls while another replica
	// mints; it grows to 10×WaitPoll, with jitter. Default 20ms.
	WaitPoll time.Duration
	// Logger gets warnings and debug events; default: discard.
	Logger *slog.Logger
	// OnMint, if set, is called after every call of a mint function, with
	// its duration and error, e.g. to feed a metric.
	OnMint func(key Key, took time.Duration, err error)
	// OnLookup, if set, is called once per flight after its first read of
	// Redis, with whether the token was there (the Hits and Misses of
	// Stats, per key), e.g. to feed a metric. Like OnMint it runs on the
	// flight's goroutine and must not block.
	OnLookup func(key Key, hit bool)
	// LocalTTL, if positive, keeps each token read or minted in this
	// process's memory for that long (at most 1 s), saving the Redis read
	// and the decryption on the hot path. Invalidate drops it at once, and
	// a token another replica replaced is used here at most LocalTTL longer
	// (one failed upstream call, then Invalidate). Keep it well below the
	// safety margin by which cached TTLs undercut the upstream lifetime.
	LocalTTL time.Duration
}

// Stats counts what a Cache did since New.
type Stats struct {
	// Mints counts calls of mint functions, failed ones included.
	Mints int64
	// MintErrors counts mint calls that failed.
	MintErrors int64
	// Hits counts flights (GetOrMint calls not joined to one already
	// running in this process) that found the token in Redis at once.
	Hits int64
	// Misses counts flights that did not.
	Misses int64
	// LockWaits counts times a flight found another replica's mint lock
	// and waited for it.
	LockWaits int64
	// Invalidations counts Invalidate calls that dropped a token.
	Invalidations int64
	// DataKeyReplacements counts tenant data keys this process replaced
	// because transit no longer unwrapped them.
	DataKeyReplacements int64
}

type counters struct {
	mints, mintErrors, hits, misses, lockWaits, invalidations atomic.Int64
}

// Cache shares upstream tokens between replicas through Redis. It is safe
// for concurrent use.
type Cache struct {
	client   redis.UniversalClient
	keys     *dataKeys
	prefix   string
	lockTTL  time.Duration
	waitPoll time.Duration
	log      *slog.Logger
	onMint   func(Key, time.Duration, error)
	onLookup func(Key, bool)

	flights singleflight.Group
	stats   counters

	localTTL time.Duration
	local    sync.Map // token key name → localEntry

	// testHookMiss, if set, runs after a flight's first read missed.
	testHookMiss func()
}

// New returns a Cache on client that seals tokens with data keys from tr.
// It panics if client or tr is nil or opts.Prefix contains a brace: those are
// programming errors.
func New(client redis.UniversalClient, tr transit.Transit, opts Options) *Cache {
	if client == nil || tr == nil {
		panic("tokencache: New needs a Redis client and a transit")
	}
	if opts.Prefix == "" {
		opts.Prefix = defaultPrefix
	}
	if strings.ContainsAny(opts.Prefix, "{}") {
		panic(fmt.Sprintf("tokencache: Redis key prefix %q must not contain '{' or '}'", opts.Prefix))
	}
	if opts.LockTTL <= 0 {
		opts.LockTTL = defaultLockTTL
	}
	if opts.WaitPoll <= 0 {
		opts.WaitPoll = defaultWaitPoll
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Cache{
		client:   client,
		keys:     newDataKeys(client, tr, opts.Prefix, opts.Logger),
		prefix:   opts.Prefix,
		lockTTL:  opts.LockTTL,
		waitPoll: opts.WaitPoll,
		log:      opts.Logger,
		onMint:   opts.OnMint,
		onLookup: opts.OnLookup,
		localTTL: min(opts.LocalTTL, maxLocalTTL),
	}
}

// maxLocalTTL bounds Options.LocalTTL: longer, and a replaced token would
// linger noticeably.
const maxLocalTTL = time.Second

// localEntry is a token remembered in memory until until.
type localEntry struct {
	e     Entry
	until time.Time
}

func (c *Cache) fromLocal(name string) (Entry, bool) {
	if c.localTTL <= 0 {
		return Entry{}, false
	}
	v, ok := c.local.Load(name)
	if !ok {
		return Entry{}, false
	}
	le := v.(localEntry)
	if time.Now().After(le.until) {
		c.local.CompareAndDelete(name, v)
		return Entry{}, false
	}
	return le.e, true
}

func (c *Cache) remember(name string, e Entry) {
	if c.localTTL > 0 {
		c.local.Store(name, localEntry{e: e, until: time.Now().Add(c.localTTL)})
	}
}

// Stats returns the counters so far.
func (c *Cache) Stats() Stats {
	return Stats{
		Mints:         c.stats.mints.Load(),
		MintErrors:    c.stats.mintErrors.Load(),
		Hits:          c.stats.hits.Load(),
		Misses:        c.stats.misses.Load(),
		LockWaits:     c.stats.lockWaits.Load(),
		Invalidations: c.stats.invalidations.Load(),
		// Kept by the data keys, which replace keys on their own.
		DataKeyReplacements: c.keys.replaced.Load(),
	}
}

// GetOrMint returns the cached token for key, or mints, caches and returns
// one; across all replicas sharing the Redis, only one mint runs per key at
// a time. A mint error goes to every caller waiting on that mint in this
// process, and nothing is cached. Waiters on other replicas do not see the
// error: once the lock is gone without a token they take it and try once
// themselves, so a failing login costs at most one attempt per replica.
//
// The work runs in a flight shared by all callers of this process asking
// for key at the same moment; it is detached from ctx, so one caller giving
// up does not fail the others, and bounded by 3×LockTTL. ctx bounds only how
// long this caller waits.
func (c *Cache) GetOrMint(ctx context.Context, key Key, mint MintFunc) (Entry, error) {
	if err := key.validate(); err != nil {
		return Entry{}, err
	}
	if mint == nil {
		return Entry{}, errors.New("tokencache: GetOrMint needs a mint function")
	}
	if err := ctx.Err(); err != nil {
		// Do not start a detached flight for a caller already gone.
		return Entry{}, fmt.Errorf("tokencache: %w", err)
	}
	n := c.names(key)
	if e, ok := c.fromLocal(n.token); ok {
		c.stats.hits.Add(1)
		if c.onLookup != nil {
			c.onLookup(key, true)
		}
		return e, nil
	}
	ch := c.flights.DoChan(n.token, func() (any, error) {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), flightRounds*c.lockTTL)
		defer cancel()
		return c.flight(fctx, key, n, mint)
	})
	select {
	case <-ctx.Done():
		return Entry{}, fmt.Errorf("tokencache: waiting for %s token: %w", key.Kind, ctx.Err())
	case r := <-ch:
		if r.Err != nil {
			return Entry{}, r.Err
		}
		e := r.Val.(Entry)
		c.remember(n.token, e)
		return e, nil
	}
}

// flight finds or mints the token: read, else lock and mint, else wait for
// the lock holder, and when the holder left without a token start over.
func (c *Cache) flight(ctx context.Context, key Key, n names, mint MintFunc) (Entry, error) {
	for first := true; ; first = false {
		e, found, err := c.read(ctx, key, n)
		if err != nil {
			return Entry{}, err
		}
		if first && c.onLookup != nil {
			c.onLookup(key, found)
		}
		if found {
			if first {
				c.stats.hits.Add(1)
			}
			return e, nil
		}
		if first {
			c.stats.misses.Add(1)
			if c.testHookMiss != nil {
				c.testHookMiss()
			}
		}
		lock, err := c.tryLock(ctx, n.lock)
		if err != nil {
			return Entry{}, err
		}
		if lock.held {
			return c.mintLocked(ctx, key, n, lock, mint)
		}
		c.stats.lockWaits.Add(1)
		e, found, err = c.waitForPeer(ctx, key, n)
		if err != nil || found {
			return e, err
		}
		c.log.DebugContext(ctx, "tokencache: lock released without a token; retrying", slog.GroupAttrs("key", keyAttrs(key)...))
	}
}

// read gets and opens the cached token. A value that does not decrypt is
// reported as a miss, so it is minted over instead of failing every call.
func (c *Cache) read(ctx context.Context, key Key, n names) (Entry, bool, error) {
	stored, err := c.client.Get(ctx, n.token).Result()
	if errors.Is(err, redis.Nil) {
		return Entry{}, false, nil
	}
	if err != nil {
		return Entry{}, false, fmt.Errorf("tokencache: read %s token: %w", key.Kind, err)
	}
	return c.decode(ctx, key, n, stored)
}

func (c *Cache) decode(ctx context.Context, key Key, n names, stored string) (Entry, bool, error) {
	token, err := c.unseal(ctx, key.Tenant, n.token, stored)
	if errors.Is(err, errUndecryptable) {
		c.log.WarnContext(ctx, "tokencache: cached token does not decrypt; it will be minted again",
			slog.GroupAttrs("key", keyAttrs(key)...))
		return Entry{}, false, nil
	}
	if err != nil {
		return Entry{}, false, err
	}
	return Entry{key: key, token: token, stored: stored}, true, nil
}

func (c *Cache) unseal(ctx context.Context, tenant, name, stored string) (string, error) {
	id, sealed, err := parseSealed(stored)
	if err != nil {
		return "", err
	}
	k, err := c.keys.byID(ctx, tenant, id)
	if err != nil {
		return "", err
	}
	return open(k, name, sealed)
}

// mintLocked runs while this flight holds the lock: check again, mint,
// store, release.
func (c *Cache) mintLocked(ctx context.Context, key Key, n names, lock mintLock, mint MintFunc) (Entry, error) {
	defer c.unlock(ctx, n.lock, lock)
	// Another replica may have stored a token between our miss and our lock.
	e, found, err := c.read(ctx, key, n)
	if err != nil || found {
		return e, err
	}
	// Get the data key before logging in, so a transit outage fails
	// without spending an upstream login.
	dk, err := c.keys.current(ctx, key.Tenant)
	if err != nil {
		return Entry{}, err
	}
	// The mint must finish while the lock is ours; after that another
	// replica may take the lock and mint too.
	mctx, cancel := context.WithDeadline(ctx, lock.expires)
	defer cancel()
	token, ttl, err := c.callMint(mctx, key, mint)
	if err != nil {
		return Entry{}, fmt.Errorf("tokencache: mint %s token: %w", key.Kind, err)
	}
	if ttl < time.Millisecond {
		return Entry{}, ErrBadTTL
	}
	return c.store(ctx, key, n, dk, token, ttl)
}

// callMint calls mint, counts it and turns a panic into an error: the flight
// runs on its own goroutine, where a panic would kill the process. The panic
// value is left out of the error and the log, as it might hold a secret.
func (c *Cache) callMint(ctx context.Context, key Key, mint MintFunc) (token string, ttl time.Duration, err error) {
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			c.log.ErrorContext(ctx, "tokencache: mint function panicked",
				slog.GroupAttrs("key", keyAttrs(key)...), slog.String("stack", string(debug.Stack())))
			token, ttl, err = "", 0, errors.New("mint function panicked")
		}
		c.stats.mints.Add(1)
		if err != nil {
			c.stats.mintErrors.Add(1)
		}
		if c.onMint != nil {
			c.onMint(key, time.Since(start), err)
		}
	}()
	return mint(ctx)
}

// store seals and caches a fresh token. If Redis refuses the write, the
// token is still returned, since the upstream login already happened; it is
// just not shared, and the next flight mints again.
func (c *Cache) store(ctx context.Context, key Key, n names, dk *dataKey, token string, ttl time.Duration) (Entry, error) {
	stored, err := seal(dk, n.token, token)
	if err != nil {
		return Entry{}, err
	}
	if err := c.client.Set(ctx, n.token, stored, ttl).Err(); err != nil {
		c.log.WarnContext(ctx, "tokencache: could not cache a minted token",
			slog.GroupAttrs("key", keyAttrs(key)...), slog.String("error", err.Error()))
	}
	return Entry{key: key, token: token, stored: stored}, nil
}

// Get returns the token cached for key, without minting one: found is
// false when there is none (or what is there does not decrypt). The
// gateway uses it to log a session out upstream before purging it.
func (c *Cache) Get(ctx context.Context, key Key) (e Entry, found bool, err error) {
	if err := key.validate(); err != nil {
		return Entry{}, false, err
	}
	return c.read(ctx, key, c.names(key))
}

// Invalidate drops e's token from Redis if Redis still holds exactly that
// value. Call it when upstream rejected the token (FleetUp 401, Wialon
// error 1); then GetOrMint again. If another replica has already replaced
// the token, the new one is kept.
func (c *Cache) Invalidate(ctx context.Context, e Entry) error {
	if e.stored == "" {
		return ErrZeroEntry
	}
	n := c.names(e.key)
	c.local.Delete(n.token)
	dropped, err := compareAndDelete.Run(ctx, c.client, []string{n.token}, e.stored).Int()
	if err != nil {
		return fmt.Errorf("tokencache: invalidate %s token: %w", e.key.Kind, err)
	}
	if dropped == 1 {
		c.stats.invalidations.Add(1)
	}
	c.log.DebugContext(ctx, "tokencache: invalidate", slog.Any("entry", e), slog.Bool("dropped", dropped == 1))
	return nil
}
