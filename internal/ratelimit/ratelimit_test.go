package ratelimit

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// newClient returns a new client (one "replica") to the backend's server.
type newClient func(t *testing.T) redis.UniversalClient

var backends = []struct {
	name  string
	setup func(t *testing.T) newClient
}{
	{"redis", func(t *testing.T) newClient { return realServer(testenv.Redis(t)) }},
	{"cluster", func(t *testing.T) newClient { return realServer(testenv.RedisCluster(t)) }},
	{"miniredis", func(t *testing.T) newClient {
		m := miniredis.RunT(t)
		return func(t *testing.T) redis.UniversalClient {
			c := redis.NewClient(&redis.Options{Addr: m.Addr()})
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
	}},
}

func realServer(srv testenv.RedisServer) newClient {
	return func(t *testing.T) redis.UniversalClient { return srv.Client(t) }
}

func forEachBackend(t *testing.T, test func(t *testing.T, connect newClient)) {
	t.Helper()
	for _, bk := range backends {
		t.Run(bk.name, func(t *testing.T) {
			t.Parallel()
			test(t, bk.setup(t))
		})
	}
}

// limiters returns n Limiters on separate clients sharing one prefix.
func limiters(t *testing.T, connect newClient, n int) []*Limiter {
	prefix := testenv.RedisPrefix(t)
	out := make([]*Limiter, n)
	for i := range out {
		out[i] = New(connect(t), prefix)
	}
	return out
}

// fiveASecond has an emission interval of 200ms and no burst beyond one.
var fiveASecond = PerSecond(5, 1)

// maxAllowed is how many calls fiveASecond can allow within elapsed: the
// first, one per 200ms after it, and one spare for a boundary crossed.
func maxAllowed(elapsed time.Duration) int {
	return 2 + int(elapsed/(200*time.Millisecond))
}

func TestAllowBurst(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		tests := []struct {
			name     string
			replicas int
		}{
			{"one limiter", 1},
			{"two limiters share the budget", 2},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				ls := limiters(t, connect, tt.replicas)
				start := time.Now()
				allowed := 0
				for i := range 10 {
					ok, retry, err := ls[i%len(ls)].Allow(t.Context(), "fleetup-12345", fiveASecond)
					if err != nil {
						t.Fatal(err)
					}
					if ok {
						allowed++
						continue
					}
					if retry <= 0 || retry > 250*time.Millisecond {
						t.Errorf("denied with retryAfter %s, want within (0, 200ms]", retry)
					}
				}
				elapsed := time.Since(start)
				if allowed < 1 || allowed > maxAllowed(elapsed) {
					t.Errorf("%d of 10 calls allowed in %s, want 1..%d", allowed, elapsed, maxAllowed(elapsed))
				}
			})
		}
	})
}

// With a slow limit the sharing is exact: one call in a minute, whichever
// replica makes it.
func TestLimitersShareBudget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		ls := limiters(t, connect, 3)
		slow := Limit{Rate: 1, Period: time.Minute, Burst: 1}
		allowed := 0
		for i := range 9 {
			ok, _, err := ls[i%len(ls)].Allow(t.Context(), "fleetup-12345", slow)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				allowed++
			}
		}
		if allowed != 1 {
			t.Errorf("%d of 9 calls over 3 limiters allowed, want 1", allowed)
		}
	})
}

func TestAccountsAreIndependent(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		l := limiters(t, connect, 1)[0]
		slow := Limit{Rate: 1, Period: time.Minute, Burst: 1}
		for _, account := range []string{"a", "b", "c"} {
			if ok, _, err := l.Allow(t.Context(), account, slow); err != nil || !ok {
				t.Fatalf("first call for %q: allowed=%v, %v", account, ok, err)
			}
		}
		if ok, _, err := l.Allow(t.Context(), "a", slow); err != nil || ok {
			t.Fatalf("second call for a: allowed=%v, %v; want denied", ok, err)
		}
	})
}

func TestWaitSpacesCalls(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		ls := limiters(t, connect, 2)
		const calls = 4
		times := make([]time.Time, calls)
		for i := range calls {
			if err := ls[i%2].Wait(t.Context(), "fleetup-12345", fiveASecond); err != nil {
				t.Fatal(err)
			}
			times[i] = time.Now()
		}
		// Three intervals of 200ms; generous bounds for a noisy machine.
		total := times[calls-1].Sub(times[0])
		if total < 500*time.Millisecond || total > 3*time.Second {
			t.Errorf("%d Waits took %s, want about 600ms", calls, total)
		}
		for i := 1; i < calls; i++ {
			if gap := times[i].Sub(times[i-1]); gap < 100*time.Millisecond {
				t.Errorf("Wait %d came %s after the previous one, want about 200ms", i, gap)
			}
		}
	})
}

func TestWaitGivesUpBeforeDeadline(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		l := limiters(t, connect, 1)[0]
		slow := Limit{Rate: 1, Period: 10 * time.Second, Burst: 1}
		if err := l.Wait(t.Context(), "acct", slow); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		start := time.Now()
		err := l.Wait(ctx, "acct", slow)
		var limited *LimitedError
		if !errors.Is(err, ErrLimited) || !errors.As(err, &limited) {
			t.Fatalf("Wait = %v, want a *LimitedError", err)
		}
		if limited.RetryAfter < 5*time.Second || limited.RetryAfter > 10*time.Second {
			t.Errorf("RetryAfter %s, want about 10s", limited.RetryAfter)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("Wait took %s to see it could not make the deadline", d)
		}
	})
}

func TestWaitStopsOnCancel(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		l := limiters(t, connect, 1)[0]
		slow := Limit{Rate: 1, Period: 10 * time.Second, Burst: 1}
		if err := l.Wait(t.Context(), "acct", slow); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		if err := l.Wait(ctx, "acct", slow); !errors.Is(err, context.Canceled) {
			t.Fatalf("Wait = %v, want context.Canceled", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("Wait returned %s after being cancelled at 50ms", d)
		}
	})
}

func TestInvalidArguments(t *testing.T) {
	l := New(redis.NewClient(&redis.Options{Addr: miniredis.RunT(t).Addr()}), "")
	tests := []struct {
		name    string
		account string
		limit   Limit
	}{
		{"empty account", "", PerSecond(1, 2)},
		{"zero rate", "a", Limit{Rate: 0, Period: time.Second, Burst: 1}},
		{"zero period", "a", Limit{Rate: 1, Burst: 1}},
		{"zero burst", "a", Limit{Rate: 1, Period: time.Second}},
		{"negative rate", "a", Limit{Rate: -1, Period: time.Second, Burst: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := l.Allow(t.Context(), tt.account, tt.limit); err == nil {
				t.Error("Allow accepted it")
			}
			if err := l.Wait(t.Context(), tt.account, tt.limit); err == nil {
				t.Error("Wait accepted it")
			}
			if err := l.Hold(t.Context(), tt.account, tt.limit, time.Second); err == nil {
				t.Error("Hold accepted it")
			}
		})
	}
}
