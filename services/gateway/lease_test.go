package gateway

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

func leaseReplicas(t *testing.T, n int) ([]*sessionLeases, tokencache.Key) {
	t.Helper()
	return leaseReplicasOn(t, testenv.Redis(t), n)
}

func leaseReplicasOn(t *testing.T, rs interface {
	Client(testing.TB) redis.UniversalClient
}, n int) ([]*sessionLeases, tokencache.Key) {
	t.Helper()
	prefix := testenv.RedisPrefix(t)
	out := make([]*sessionLeases, n)
	for i := range out {
		out[i] = &sessionLeases{client: rs.Client(t), prefix: prefix, logger: slog.New(slog.DiscardHandler)}
	}
	return out, tokencache.Key{Tenant: "t", Credential: "c", Generation: "g1", BaseURL: "https://up.example", Kind: wialon.TokenKind}
}

// Slots are counted across replicas: never more than the limit at once.
func TestLeaseLimitHoldsAcrossReplicas(t *testing.T) {
	replicas, key := leaseReplicas(t, 3)
	const limit = 3
	var inside, peak atomic.Int32
	var wg sync.WaitGroup
	for i := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			release, err := replicas[i%3].lease(context.Background(), key, "req", limit, 5*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			n := inside.Add(1)
			for m := peak.Load(); n > m && !peak.CompareAndSwap(m, n); m = peak.Load() {
			}
			time.Sleep(20 * time.Millisecond) // hold the slot while others try
			inside.Add(-1)
			release()
		}()
	}
	wg.Wait()
	if p := peak.Load(); p > limit || p < 2 {
		t.Errorf("peak of %d holders, want at most %d (and some overlap)", p, limit)
	}
}

// The four keys of a lease share the tenant's slot: the scripts run on a
// Redis Cluster too.
func TestLeaseOnRedisCluster(t *testing.T) {
	replicas, key := leaseReplicasOn(t, testenv.RedisShardedCluster(t), 2)
	ctx := context.Background()
	release, err := replicas[0].lease(ctx, key, "req", 1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, err := replicas[1].lease(wctx, key, "req", 1, time.Second); err == nil {
		t.Fatal("a second holder of a one-slot lease")
	}
	release()
	r, err := replicas[1].lease(ctx, key, "req", 1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r()
}

// Waiters are served in the order they asked, whichever replica they ask.
func TestLeaseIsFirstComeFirstServed(t *testing.T) {
	replicas, key := leaseReplicas(t, 2)
	ctx := context.Background()
	release, err := replicas[0].lease(ctx, key, "layer", 1, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		order []int
		wg    sync.WaitGroup
	)
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := replicas[i%2].lease(ctx, key, "layer", 1, 5*time.Second)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			r()
		}()
		waitQueued(t, replicas[0], key, "layer", i+1) // i is in line before i+1 asks
	}
	release()
	wg.Wait()
	for i, got := range order {
		if got != i {
			t.Fatalf("served in order %v, want 0..5", order)
		}
	}
}

// waitQueued waits until n waiters are in line for name.
func waitQueued(t *testing.T, l *sessionLeases, key tokencache.Key, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for l.client.ZCard(context.Background(), l.keys(key, name)[1]).Val() < int64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters never queued", n)
		}
		time.Sleep(time.Millisecond)
	}
}

// A replica that dies holding a slot (it stops renewing) frees it once the
// TTL has passed; one that lives keeps it however long it holds it.
func TestLeaseOfADeadReplicaExpires(t *testing.T) {
	replicas, key := leaseReplicas(t, 2)
	ctx := context.Background()
	const ttl = 300 * time.Millisecond

	// A live holder renews past several TTLs.
	release, err := replicas[0].lease(ctx, key, "layer", 1, ttl)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 3*ttl)
	_, err = replicas[1].lease(wctx, key, "layer", 1, ttl)
	cancel()
	if err == nil {
		t.Fatal("a renewed slot was granted to another replica")
	}
	if n := replicas[1].client.ZCard(ctx, replicas[1].keys(key, "layer")[1]).Val(); n != 0 {
		t.Errorf("a waiter that gave up is still in line (%d)", n)
	}
	release()

	// A dead holder: the slot is taken and never renewed or released.
	if _, err := leaseAcquire.Run(ctx, replicas[0].client, replicas[0].keys(key, "layer"), "dead-replica", 1, ttl.Milliseconds()).Result(); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	r, err := replicas[1].lease(ctx, key, "layer", 1, ttl)
	if err != nil {
		t.Fatal(err)
	}
	r()
	if waited := time.Since(began); waited < ttl/2 {
		t.Errorf("granted after %v, while the dead replica's slot was still valid", waited)
	}
}
