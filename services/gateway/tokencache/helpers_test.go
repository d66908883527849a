package tokencache

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// backend is one Redis the tests run against. Each newClient call is a
// separate connection pool: one "replica".
type backend struct {
	prefix string
	// realTime is set when advance really waits.
	realTime  bool
	newClient func(t *testing.T) redis.UniversalClient
	// advance lets d of Redis time pass: a real sleep for redis-server, a
	// fast-forward of the clock for miniredis, whose TTLs never run out
	// on their own.
	advance func(d time.Duration)
}

var backends = []struct {
	name  string
	setup func(t *testing.T) *backend
}{
	{"redis", func(t *testing.T) *backend { return realBackend(t, testenv.Redis(t)) }},
	// A Cluster of three masters, as deployed. Its nodes reject any command
	// or script whose keys span slots, proving the key layout is
	// Cluster-safe, and the client follows MOVED redirections to the master
	// owning each tenant's slot.
	{"cluster", func(t *testing.T) *backend { return realBackend(t, testenv.RedisShardedCluster(t)) }},
	// The master found through Sentinels.
	{"sentinel", func(t *testing.T) *backend { return realBackend(t, testenv.RedisSentinel(t)) }},
	{"miniredis", func(t *testing.T) *backend {
		m := miniredis.RunT(t)
		return &backend{
			prefix: testenv.RedisPrefix(t),
			newClient: func(t *testing.T) redis.UniversalClient {
				c := redis.NewClient(&redis.Options{Addr: m.Addr()})
				t.Cleanup(func() { _ = c.Close() })
				return c
			},
			advance: m.FastForward,
		}
	}},
}

// redisTarget is a Redis deployment from testenv.
type redisTarget interface {
	Client(t testing.TB) redis.UniversalClient
}

func realBackend(t *testing.T, srv redisTarget) *backend {
	return &backend{
		prefix:    testenv.RedisPrefix(t),
		realTime:  true,
		newClient: func(t *testing.T) redis.UniversalClient { return srv.Client(t) },
		advance:   time.Sleep,
	}
}

// fresh returns b with a key prefix of its own, for a subtest that must not
// see its siblings' keys.
func (b *backend) fresh(t *testing.T) *backend {
	c := *b
	c.prefix = testenv.RedisPrefix(t)
	return &c
}

// forEachBackend runs test against every backend, in parallel.
func forEachBackend(t *testing.T, test func(t *testing.T, b *backend)) {
	t.Helper()
	for _, bk := range backends {
		t.Run(bk.name, func(t *testing.T) {
			t.Parallel()
			test(t, bk.setup(t))
		})
	}
}

// newTransit returns the dev keyring. Replicas must share it, just as they
// share one Vault transit key in production.
func newTransit(t *testing.T) transit.Transit {
	t.Helper()
	kr, err := transit.NewKeyring()
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// replicas returns n Caches on separate clients of b, sharing tr.
func replicas(t *testing.T, b *backend, tr transit.Transit, n int, opts Options) []*Cache {
	t.Helper()
	opts.Prefix = b.prefix
	out := make([]*Cache, n)
	for i := range out {
		out[i] = New(b.newClient(t), tr, opts)
	}
	return out
}

// minter is a mint function that counts its calls and returns a new token
// each time.
type minter struct {
	name  string
	ttl   time.Duration
	delay time.Duration // widens the race window for concurrency tests
	calls atomic.Int64
}

func (m *minter) mint(ctx context.Context) (string, time.Duration, error) {
	n := m.calls.Add(1)
	if err := sleep(ctx, m.delay); err != nil {
		return "", 0, err
	}
	return fmt.Sprintf("%s-%d", m.name, n), m.ttl, nil
}

func newMinter(name string) *minter {
	return &minter{name: name, ttl: time.Minute}
}

func testKey(tenant, credential string) Key {
	return Key{Tenant: tenant, Credential: credential, Generation: "g1", BaseURL: "https://up.example", Kind: jwtKind}
}

// totalStats sums the counters of several replicas.
func totalStats(caches ...*Cache) Stats {
	var s Stats
	for _, c := range caches {
		cs := c.Stats()
		s.Mints += cs.Mints
		s.MintErrors += cs.MintErrors
		s.Hits += cs.Hits
		s.Misses += cs.Misses
		s.LockWaits += cs.LockWaits
		s.Invalidations += cs.Invalidations
		s.DataKeyReplacements += cs.DataKeyReplacements
	}
	return s
}

// waitUntil polls cond for up to d, for asynchronous effects in tests.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer = testenv.LogBuffer

func debugLogger(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// allValues returns every key and string value in the Redis behind c.
func allValues(t *testing.T, c redis.UniversalClient) map[string]string {
	t.Helper()
	ctx := context.Background()
	out := map[string]string{}
	var mu sync.Mutex
	scan := func(ctx context.Context, node redis.Cmdable) error {
		iter := node.Scan(ctx, 0, "*", 1000).Iterator()
		for iter.Next(ctx) {
			k := iter.Val()
			typ, err := node.Type(ctx, k).Result()
			if err != nil {
				return err
			}
			if typ != "string" {
				return fmt.Errorf("key %q has type %s; this package only writes strings", k, typ)
			}
			v, err := node.Get(ctx, k).Result()
			if err != nil && err != redis.Nil {
				return err
			}
			mu.Lock()
			out[k] = v
			mu.Unlock()
		}
		return iter.Err()
	}
	var err error
	if cc, ok := c.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error { return scan(ctx, n) })
	} else {
		err = scan(ctx, c)
	}
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Token kinds as providers name theirs; the cache treats every kind alike.
const (
	eidKind = "wialon-eid"
	jwtKind = "fleetup-jwt"
)
