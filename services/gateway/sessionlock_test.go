package gateway

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

func TestSessionLockSerializesAcrossReplicas(t *testing.T) {
	rs := testenv.Redis(t)
	prefix := testenv.RedisPrefix(t)
	replicas := []*sessionLock{
		{client: rs.Client(t), prefix: prefix, ttl: 5 * time.Second},
		{client: rs.Client(t), prefix: prefix, ttl: 5 * time.Second},
	}
	key := tokencache.Key{Tenant: "t", Credential: "c", Generation: "g1", BaseURL: "https://up.example", Kind: wialon.TokenKind}
	var inside, maxInside atomic.Int32
	done := make(chan struct{})
	for i := range 6 {
		go func() {
			defer func() { done <- struct{}{} }()
			release, err := replicas[i%2].lock(context.Background(), key, "loader")
			if err != nil {
				t.Error(err)
				return
			}
			n := inside.Add(1)
			for m := maxInside.Load(); n > m && !maxInside.CompareAndSwap(m, n); m = maxInside.Load() {
			}
			time.Sleep(30 * time.Millisecond)
			inside.Add(-1)
			release()
		}()
	}
	for range 6 {
		<-done
	}
	if maxInside.Load() != 1 {
		t.Fatalf("%d loads ran at once on one session, want 1", maxInside.Load())
	}

	// A holder that never releases blocks others only until the lock's TTL.
	short := &sessionLock{client: rs.Client(t), prefix: prefix, ttl: 300 * time.Millisecond}
	if _, err := short.lock(context.Background(), key, "loader"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	release, err := short.lock(ctx, key, "loader")
	if err != nil {
		t.Fatalf("lock of a crashed holder never expired: %v", err)
	}
	release()
	if waited := time.Since(start); waited < 200*time.Millisecond {
		t.Fatalf("took a held lock after %v", waited)
	}
}
