package wialon

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Wialon counts logins per IP address, for every tenant behind it: more
// than 10 failed or 120 successful logins a minute, and the address is
// blocked — for every tenant (upstream-facts.md, "Limits"). The login
// guard keeps every credentials-service replica that shares an egress
// address within both, through Redis, and remembers tokens Wialon refused
// so that a refused credential costs one failed login, not one per call.
//
// A replica cannot see its egress address, so the budget is keyed by a
// configured egress group (--wialon-egress-group): replicas that leave
// through one address must share a group and a Redis.
//
// Every attempt counts against both budgets while it runs — its outcome
// is not known yet — and is then kept in the one it turned out to belong
// to: a success in the successful budget, a refusal (error 8) in the
// failed one. An attempt whose outcome stays unknown (no answer) stays in
// both. So at most Failed logins can be in flight at once, and the failed
// budget can never be overrun by logins that were still running. A login
// that finds a budget full only of attempts still running waits for them
// to settle (polling every loginPoll), not for the window to pass: more
// than Failed concurrent logins queue for a few milliseconds, they are not
// refused.
//
// Key layout (the group is the hash tag):
//
//	<prefix>:{wialon-login:<group>}:ok        sorted set: attempt id, score = time (ms)
//	<prefix>:{wialon-login:<group>}:fail      sorted set: attempt id, score = time (ms)
//	<prefix>:{wialon-login:<group>}:inflight  sorted set: attempts still running, score = start (ms)
//	<prefix>:wialon-refused:<digest>      a token Wialon refused, TTL = RefusedTTL
//
// <digest> is a SHA-256 of the base URL and the token: no token is ever
// stored.

// Defaults of the login limits: Wialon's documented values.
const (
	DefaultLoginsPerMinute       = 120
	DefaultFailedLoginsPerMinute = 10
	DefaultEgressGroup           = "default"
	DefaultRefusedTTL            = time.Hour
	loginWindow                  = time.Minute
	// loginPoll is how often a login waiting for attempts still running
	// to settle asks again (plus jitter).
	loginPoll = 50 * time.Millisecond
	// loginRunning is how long an attempt counts as running at most: one
	// whose replica died before settling it stops counting then (it stays
	// in both budgets, as one without an answer).
	loginRunning = 2 * time.Minute
)

// loginReserve is how much of each budget a background login (keep-alive)
// leaves to logins callers are waiting for.
const loginReserve = 0.5

// loginAcquire takes a slot in both budgets (KEYS ok, fail) for attempt
// ARGV[1] if each has fewer than its limit (ARGV[2] ok, ARGV[3] fail)
// minus the reserve (ARGV[4], a fraction) in the last ARGV[5] ms, and
// marks it running (KEYS inflight, for at most ARGV[7] ms). Reply {1, 0}
// when taken, else {0, ms to wait}: until the oldest entry of a full
// budget leaves the window, or ARGV[6] ms while attempts are still running
// (one may settle and free its slot in the other budget at any moment).
var loginAcquire = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[5])
local reserve = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[7]))
local running = redis.call('ZCARD', KEYS[3]) > 0
local wait = 0
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local limit = tonumber(ARGV[i + 1])
  local allowed = limit - math.floor(limit * reserve)
  if allowed < 1 then allowed = 1 end
  if redis.call('ZCARD', KEYS[i]) >= allowed then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local w = tonumber(oldest[2]) + window - now
    if running and w > tonumber(ARGV[6]) then w = tonumber(ARGV[6]) end
    if w > wait then wait = w end
  end
end
if wait > 0 then return {0, wait} end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window * 2)
redis.call('PEXPIRE', KEYS[2], window * 2)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]))
return {1, 0}
`)

// loginGuard is the login budget of an egress group and the cache of
// refused tokens.
type loginGuard struct {
	rdb        redis.UniversalClient // nil: this process only
	prefix     string
	group      string
	succeeded  int
	failed     int
	refusedTTL time.Duration
	local      *localLogins
}

func newLoginGuard(env provider.Env) *loginGuard {
	l := env.Tuning.LoginLimits
	g := &loginGuard{rdb: env.Redis, prefix: env.RedisPrefix, group: l.EgressGroup,
		succeeded: l.Succeeded, failed: l.Failed, refusedTTL: l.RefusedTTL, local: newLocalLogins()}
	g.prefix = keyspace.Prefix(g.prefix)
	if g.group == "" {
		g.group = DefaultEgressGroup
	}
	if g.succeeded <= 0 {
		g.succeeded = DefaultLoginsPerMinute
	}
	if g.failed <= 0 {
		g.failed = DefaultFailedLoginsPerMinute
	}
	if g.refusedTTL <= 0 {
		g.refusedTTL = DefaultRefusedTTL
	}
	return g
}

// budgetKeys are the successful and failed budgets and the running
// attempts, in one Cluster slot.
func (g *loginGuard) budgetKeys() []string {
	tag := g.prefix + ":{wialon-login:" + g.group + "}"
	return []string{tag + ":ok", tag + ":fail", tag + ":inflight"}
}

func (g *loginGuard) refusedKey(baseURL, token string) string {
	sum := sha256.Sum256([]byte("fleetbroker wialon refused token\x00" + baseURL + "\x00" + token))
	return g.prefix + ":wialon-refused:" + hex.EncodeToString(sum[:16])
}

// errRefusedBefore answers a login with a token Wialon refused within
// refusedTTL, without asking Wialon again.
func errRefusedBefore() *upstream.Error {
	return &upstream.Error{Kind: upstream.KindRejected, Provider: providerName, Op: "token/login", Code: errBadCredentials,
		Reason: "Wialon refused this token at an earlier login; not asked again (a failed login counts against the egress IP's limit)"}
}

// login runs do, one token/login with token, within the egress group's
// budget: it waits (within ctx) for a slot, and records the outcome.
// background logins (keep-alive) leave half of each budget to others.
func (g *loginGuard) login(ctx context.Context, background bool, baseURL, token string, do func() (Session, error)) (Session, error) {
	refused, err := g.wasRefused(ctx, baseURL, token)
	if err != nil {
		return Session{}, err
	}
	if refused {
		return Session{}, errRefusedBefore()
	}
	id, err := g.acquire(ctx, background)
	if err != nil {
		return Session{}, err
	}
	s, err := do()
	g.settle(ctx, id, baseURL, token, err)
	return s, err
}

func (g *loginGuard) wasRefused(ctx context.Context, baseURL, token string) (bool, error) {
	key := g.refusedKey(baseURL, token)
	if g.rdb == nil {
		return g.local.refused(key), nil
	}
	n, err := g.rdb.Exists(ctx, key).Result()
	if err != nil {
		return false, storeError(err)
	}
	return n > 0, nil
}

// acquire waits for a slot of both budgets and returns the attempt's id.
func (g *loginGuard) acquire(ctx context.Context, background bool) (string, error) {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	id := hex.EncodeToString(b)
	reserve := 0.0
	if background {
		reserve = loginReserve
	}
	for {
		var wait time.Duration
		if g.rdb == nil {
			wait = g.local.acquire(id, g.succeeded, g.failed, reserve, time.Now())
		} else {
			res, err := loginAcquire.Run(ctx, g.rdb, g.budgetKeys(), id, g.succeeded, g.failed, reserve, loginWindow.Milliseconds(),
				loginPoll.Milliseconds(), loginRunning.Milliseconds()).Int64Slice()
			if err != nil {
				return "", storeError(err)
			}
			if res[0] == 1 {
				return id, nil
			}
			wait = time.Duration(res[1]) * time.Millisecond
		}
		if wait <= 0 {
			return id, nil
		}
		if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
			return "", &upstream.Error{Kind: upstream.KindRateLimited, Provider: providerName, Op: "token/login", RetryAfter: wait,
				Reason: "the egress IP's Wialon login budget is spent (Wialon blocks an IP past 10 failed or 120 successful logins a minute)"}
		}
		pause := wait + 10*time.Millisecond // a little past the window's edge
		if wait <= loginPoll {
			pause = wait + mrand.N(wait+1) // waiters polling together spread out
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return "", ctxError("token/login", ctx.Err())
		case <-t.C:
		}
	}
}

// settle keeps the attempt in the budget its outcome belongs to, and
// remembers a refused token.
func (g *loginGuard) settle(ctx context.Context, id, baseURL, token string, loginErr error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	var dropOK, dropFailed bool
	var ue *upstream.Error
	switch {
	case loginErr == nil:
		dropFailed = true
	case upstream.KindOf(loginErr) == upstream.KindRejected:
		dropOK = true
	case errors.As(loginErr, &ue) && ue.Code != 0:
		// Wialon answered with another error: not a login either way
		// (unverified; 1003 while the IP is blocked is the likely one).
		dropOK, dropFailed = true, true
	default:
		// No answer: Wialon may have counted it either way, so it stays in
		// both budgets; it is no longer running.
	}
	if g.rdb == nil {
		g.local.settle(id, dropOK, dropFailed)
	} else {
		keys := g.budgetKeys()
		_, _ = g.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			if dropOK {
				p.ZRem(ctx, keys[0], id)
			}
			if dropFailed {
				p.ZRem(ctx, keys[1], id)
			}
			p.ZRem(ctx, keys[2], id)
			return nil
		})
	}
	if upstream.KindOf(loginErr) == upstream.KindRejected {
		key := g.refusedKey(baseURL, token)
		if g.rdb == nil {
			g.local.refuse(key, g.refusedTTL)
		} else {
			_ = g.rdb.Set(ctx, key, "1", g.refusedTTL).Err() // best effort: the credential is marked rejected too
		}
	}
}

// storeError reports that the shared login budget could not be read: no
// login is made without it.
func storeError(err error) error {
	return &upstream.Error{Kind: upstream.KindUnavailable, Provider: providerName, Op: "token/login", RetryAfter: time.Second,
		Reason: "the shared login budget is unavailable (Redis)", Err: fmt.Errorf("login budget: %w", err)}
}

// localLogins is the login guard of a process without Redis.
type localLogins struct {
	mu       sync.Mutex
	ok, fail map[string]time.Time
	running  map[string]bool
	refusals map[string]time.Time
}

func newLocalLogins() *localLogins {
	return &localLogins{ok: map[string]time.Time{}, fail: map[string]time.Time{}, running: map[string]bool{}, refusals: map[string]time.Time{}}
}

func (l *localLogins) acquire(id string, succeeded, failed int, reserve float64, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var wait time.Duration
	for _, b := range []struct {
		m     map[string]time.Time
		limit int
	}{{l.ok, succeeded}, {l.fail, failed}} {
		oldest := now
		for k, t := range b.m {
			if now.Sub(t) >= loginWindow {
				delete(b.m, k)
			} else if t.Before(oldest) {
				oldest = t
			}
		}
		if len(b.m) >= max(b.limit-int(float64(b.limit)*reserve), 1) {
			w := oldest.Add(loginWindow).Sub(now)
			if len(l.running) > 0 {
				w = min(w, loginPoll)
			}
			wait = max(wait, w)
		}
	}
	if wait > 0 {
		return wait
	}
	l.ok[id], l.fail[id], l.running[id] = now, now, true
	return 0
}

func (l *localLogins) settle(id string, dropOK, dropFail bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.running, id)
	if dropOK {
		delete(l.ok, id)
	}
	if dropFail {
		delete(l.fail, id)
	}
}

func (l *localLogins) refuse(key string, ttl time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refusals[key] = time.Now().Add(ttl)
}

func (l *localLogins) refused(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	until, ok := l.refusals[key]
	if ok && time.Now().After(until) {
		delete(l.refusals, key)
		return false
	}
	return ok
}

// CheckEgressGroup reports whether an egress group can name Redis keys.
func CheckEgressGroup(g string) error {
	if g == "" || strings.ContainsAny(g, "{}: \x00") {
		return fmt.Errorf("wialon egress group %q: must be non-empty, without braces, colons or spaces", g)
	}
	return nil
}
