package wialon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// guards returns n login guards of one egress group sharing a real Redis
// (replicas of the credentials service), or each on its own without Redis.
func guards(t *testing.T, shared bool, n int, limits provider.LoginLimits) []*loginGuard {
	t.Helper()
	var rdb redis.UniversalClient
	prefix := "fb"
	if shared {
		rdb = testenv.Redis(t).Client(t)
		prefix = testenv.RedisPrefix(t)
	}
	out := make([]*loginGuard, n)
	for i := range out {
		out[i] = newLoginGuard(provider.Env{Redis: rdb, RedisPrefix: prefix, Tuning: provider.Tuning{LoginLimits: limits}})
	}
	return out
}

var (
	badToken = func() (Session, error) { return Session{}, classify("token/login", errBadCredentials, "invalid token") }
	accepted = func() (Session, error) { return Session{SID: "s", User: "u"}, nil }
	noAnswer = func() (Session, error) {
		return Session{}, &upstream.Error{Kind: upstream.KindUnavailable, Provider: providerName, Op: "token/login", Err: errors.New("connection reset")}
	}
)

func TestLoginBudgetIsSharedByReplicas(t *testing.T) {
	for _, shared := range []bool{true, false} {
		t.Run(fmt.Sprintf("redis=%v", shared), func(t *testing.T) {
			replicas := 2
			if !shared {
				replicas = 1 // without Redis the budget is per process
			}
			g := guards(t, shared, replicas, provider.LoginLimits{Failed: 3, Succeeded: 4})
			var logins, limited atomic.Int32
			var wg sync.WaitGroup
			for i := range 6 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					defer cancel()
					_, err := g[i%replicas].login(ctx, false, "https://w.example", fmt.Sprintf("token-%d", i), func() (Session, error) {
						logins.Add(1)
						return badToken()
					})
					var ue *upstream.Error
					switch {
					case upstream.KindOf(err) == upstream.KindRejected:
					case errors.As(err, &ue) && ue.Kind == upstream.KindRateLimited && ue.RetryAfter > 0:
						limited.Add(1)
					default:
						t.Errorf("login %d: %v", i, err)
					}
				}()
			}
			wg.Wait()
			if logins.Load() != 3 || limited.Load() != 3 {
				t.Errorf("%d failed logins reached Wialon, %d were held back; want 3 and 3", logins.Load(), limited.Load())
			}
			// The failed budget holds good logins back too: their outcome is
			// unknown until they run.
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if _, err := g[0].login(ctx, false, "https://w.example", "good", accepted); upstream.KindOf(err) != upstream.KindRateLimited {
				t.Errorf("a login while the failed budget is spent: %v, want rate_limited", err)
			}
		})
	}
}

// TestConcurrentLoginsQueueForRunningOnes: more logins at once than the
// failed budget may have running wait for the running ones to settle,
// instead of being refused for a minute (a gateway fleet starting cold
// mints many sessions at once); never more than Failed run at once.
func TestConcurrentLoginsQueueForRunningOnes(t *testing.T) {
	for _, shared := range []bool{true, false} {
		t.Run(fmt.Sprintf("redis=%v", shared), func(t *testing.T) {
			replicas := 2
			if !shared {
				replicas = 1
			}
			g := guards(t, shared, replicas, provider.LoginLimits{Failed: 3, Succeeded: 100})
			var running, most atomic.Int32
			slow := func() (Session, error) {
				n := running.Add(1)
				for {
					m := most.Load()
					if n <= m || most.CompareAndSwap(m, n) {
						break
					}
				}
				time.Sleep(20 * time.Millisecond) // Wialon's answer takes a while
				running.Add(-1)
				return accepted()
			}
			var wg sync.WaitGroup
			for i := range 12 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					if _, err := g[i%replicas].login(ctx, false, "https://w.example", fmt.Sprintf("token-%d", i), slow); err != nil {
						t.Errorf("login %d: %v", i, err)
					}
				}()
			}
			wg.Wait()
			if m := most.Load(); m > 3 {
				t.Errorf("%d logins ran at once, want at most the failed budget, 3", m)
			}
		})
	}
}

func TestSuccessfulLoginBudgetAndTheBackgroundReserve(t *testing.T) {
	g := guards(t, true, 2, provider.LoginLimits{Failed: 10, Succeeded: 4})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for i := range 2 {
		if _, err := g[i].login(ctx, false, "https://w.example", "t", accepted); err != nil {
			t.Fatal(err)
		}
	}
	// Half of the budget is left: keep-alives may not take it.
	if _, err := g[0].login(ctx, true, "https://w.example", "t", accepted); upstream.KindOf(err) != upstream.KindRateLimited {
		t.Errorf("a background login with half the budget spent: %v, want rate_limited", err)
	}
	for i := range 2 {
		if _, err := g[i].login(ctx, false, "https://w.example", "t", accepted); err != nil {
			t.Fatalf("login %d within the budget: %v", i+3, err)
		}
	}
	if _, err := g[1].login(ctx, false, "https://w.example", "t", accepted); upstream.KindOf(err) != upstream.KindRateLimited {
		t.Errorf("a 5th successful login in the minute: %v, want rate_limited", err)
	}
	// Another egress group has its own budget.
	other := newLoginGuard(provider.Env{Redis: g[0].rdb, RedisPrefix: g[0].prefix,
		Tuning: provider.Tuning{LoginLimits: provider.LoginLimits{Failed: 10, Succeeded: 4, EgressGroup: "nat-b"}}})
	if _, err := other.login(ctx, false, "https://w.example", "t", accepted); err != nil {
		t.Errorf("a login of another egress group: %v", err)
	}
}

func TestRefusedTokenIsNotTriedAgain(t *testing.T) {
	g := guards(t, true, 2, provider.LoginLimits{})
	ctx := context.Background()
	const token = "REFUSEDtokenREFUSEDtokenREFUSEDtokenREFUSEDtokenREFUSEDtokenREFUSEDtoken"
	if _, err := g[0].login(ctx, false, "https://w.example", token, badToken); upstream.KindOf(err) != upstream.KindRejected {
		t.Fatalf("first login: %v", err)
	}
	var tried atomic.Int32
	count := func() (Session, error) { tried.Add(1); return badToken() }
	for i := range 5 {
		_, err := g[i%2].login(ctx, false, "https://w.example", token, count)
		if upstream.KindOf(err) != upstream.KindRejected || !strings.Contains(err.Error(), "earlier login") {
			t.Errorf("login %d with a refused token: %v", i, err)
		}
	}
	if tried.Load() != 0 {
		t.Errorf("a refused token was sent to Wialon %d more times", tried.Load())
	}
	// On another Wialon the same string is another token.
	if _, err := g[0].login(ctx, false, "https://w2.example", token, count); err == nil || tried.Load() != 1 {
		t.Errorf("the same token on another host: %v, %d tries", err, tried.Load())
	}
	keys, err := g[0].rdb.Keys(ctx, g[0].prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		v, _ := g[0].rdb.Dump(ctx, k).Result()
		if strings.Contains(k, token) || strings.Contains(v, token) {
			t.Errorf("the token is in Redis under %s", k)
		}
	}
}

// An attempt without an answer may have counted either way at Wialon: it
// stays in both budgets; an answer other than success or refusal in
// neither.
func TestLoginOutcomesSettleTheBudgets(t *testing.T) {
	g := guards(t, true, 1, provider.LoginLimits{Failed: 2, Succeeded: 100})[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	blocked := func() (Session, error) { return Session{}, classify("token/login", errConcurrentLimit, "LIMIT") }
	for range 3 {
		if _, err := g.login(ctx, false, "https://w.example", "t", blocked); upstream.KindOf(err) != upstream.KindRateLimited {
			t.Fatalf("a 1003 answer: %v", err)
		}
	}
	for range 2 {
		if _, err := g.login(ctx, false, "https://w.example", "t", noAnswer); upstream.KindOf(err) != upstream.KindUnavailable {
			t.Fatalf("no answer: %v", err)
		}
	}
	if _, err := g.login(ctx, false, "https://w.example", "t", accepted); upstream.KindOf(err) != upstream.KindRateLimited {
		t.Errorf("after two unanswered attempts the failed budget of 2 is spent; got %v", err)
	}
}
