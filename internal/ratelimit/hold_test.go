package ratelimit

import (
	"testing"
	"time"
)

// A hold (an upstream's Retry-After) closes the account's budget on every
// replica until it ends, whatever burst was left, and never shortens a
// longer hold. The retry-after Allow reports is the hold's remainder: that
// is redis_rate's own script reading the state Hold wrote.
func TestHoldClosesTheBudget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		tests := []struct {
			name  string
			limit Limit
		}{
			{"burst left", PerSecond(10, 10)},
			{"slow account", Limit{Rate: 1, Period: time.Minute, Burst: 3}},
			{"burst one", PerSecond(1, 1)},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				ls := limiters(t, connect, 2)
				ctx := t.Context()
				if ok, _, err := ls[0].Allow(ctx, "acct", tt.limit); err != nil || !ok {
					t.Fatalf("first slot: %v, %v", ok, err)
				}
				const hold = 30 * time.Second
				if err := ls[0].Hold(ctx, "acct", tt.limit, hold); err != nil {
					t.Fatal(err)
				}
				for i, l := range ls {
					ok, retry, err := l.Allow(ctx, "acct", tt.limit)
					if err != nil || ok {
						t.Fatalf("replica %d during the hold: allowed=%v, %v", i, ok, err)
					}
					if retry < hold-2*time.Second || retry > hold+time.Second {
						t.Errorf("replica %d: retry after %v, want about %v", i, retry, hold)
					}
				}
				// A shorter hold leaves the longer one in place.
				if err := ls[1].Hold(ctx, "acct", tt.limit, time.Second); err != nil {
					t.Fatal(err)
				}
				if _, retry, _ := ls[1].Allow(ctx, "acct", tt.limit); retry < hold-2*time.Second {
					t.Errorf("a 1s hold shortened a %v one to %v", hold, retry)
				}
				// Other accounts are untouched.
				if ok, _, err := ls[1].Allow(ctx, "other", tt.limit); err != nil || !ok {
					t.Errorf("another account: allowed=%v, %v", ok, err)
				}
			})
		}
	})
}

// A short hold ends: the next slot comes when it does, not a burst later.
func TestHoldEnds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		l := limiters(t, connect, 1)[0]
		limit := PerSecond(100, 5)
		if err := l.Hold(t.Context(), "acct", limit, 300*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := l.Wait(t.Context(), "acct", limit); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
			t.Errorf("the first slot after a 300ms hold came after %v", d)
		}
	})
}
