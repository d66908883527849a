package ratelimit

import (
	"context"
	"testing"
	"time"
)

func TestLeaseSize(t *testing.T) {
	tests := []struct {
		limit Limit
		want  int
	}{
		{PerSecond(1, 2), 0},         // about 1/s (FleetUp's guidance): a round trip per request
		{PerSecond(10, 10), 0},       // half a slot per lease window: no lease
		{PerSecond(1000, 1000), 50},  // 50 ms worth
		{PerSecond(1000, 5), 5},      // never more than the burst
		{PerSecond(1_000_000, 1), 1}, // burst 1: leasing cannot help
		{PerSecond(100_000, 1e6), 5000},
	}
	for _, tt := range tests {
		if got := leaseSize(tt.limit); got != tt.want {
			t.Errorf("leaseSize(%+v) = %d, want %d", tt.limit, got, tt.want)
		}
	}
}

// A large budget is taken from Redis a lease at a time, and replicas still
// share it: two limiters never allow more than rate × time + bursts + leases.
func TestLeasesSaveRoundTripsAndKeepTheBudget(t *testing.T) {
	forEachBackend(t, func(t *testing.T, connect newClient) {
		ls := limiters(t, connect, 2)
		limit := PerSecond(400, 40) // leases of 20
		ctx := context.Background()
		start := time.Now()
		allowed := 0
		for time.Since(start) < 500*time.Millisecond {
			for _, l := range ls {
				ok, _, err := l.Allow(ctx, "big", limit)
				if err != nil {
					t.Fatal(err)
				}
				if ok {
					allowed++
				}
			}
		}
		elapsed := time.Since(start)
		// The budget: 400/s plus the burst, plus at most one unspent lease
		// per limiter that expired (slots lost, never extra).
		if max := int(400*elapsed.Seconds()) + 40 + 2*20; allowed > max {
			t.Fatalf("allowed %d in %v; the shared budget allows at most %d", allowed, elapsed, max)
		}
		if allowed < 100 {
			t.Fatalf("allowed only %d in %v: leases are starving the budget", allowed, elapsed)
		}
		v, ok := ls[0].leases.Load("big")
		if !ok || v.(*lease).expires.IsZero() {
			t.Fatal("no lease was taken for a 400/s budget")
		}
	})
}
