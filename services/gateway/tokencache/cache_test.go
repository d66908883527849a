package tokencache

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// The headline property: any number of callers on any number of replicas
// cause one upstream login.
func TestGetOrMintMintsOnceAcrossReplicas(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		const callers = 200
		caches := replicas(t, b, newTransit(t), 3, Options{WaitPoll: 5 * time.Millisecond})
		m := newMinter("jwt")
		m.delay = 100 * time.Millisecond // every caller arrives while the mint runs
		key := testKey("acme", "fleetup-1")

		var wg sync.WaitGroup
		start := make(chan struct{})
		tokens := make([]string, callers)
		errs := make([]error, callers)
		for i := range callers {
			wg.Go(func() {
				<-start
				e, err := caches[i%len(caches)].GetOrMint(t.Context(), key, m.mint)
				tokens[i], errs[i] = e.Token(), err
			})
		}
		close(start)
		wg.Wait()

		for i := range callers {
			if errs[i] != nil {
				t.Fatalf("caller %d: %v", i, errs[i])
			}
			if tokens[i] != "jwt-1" {
				t.Fatalf("caller %d got token %q, want jwt-1", i, tokens[i])
			}
		}
		if got := m.calls.Load(); got != 1 {
			t.Errorf("mint called %d times, want 1", got)
		}
		if s := totalStats(caches...); s.Mints != 1 || s.MintErrors != 0 {
			t.Errorf("stats %+v: want Mints 1, MintErrors 0", s)
		}
		// Later calls are hits on every replica.
		for _, c := range caches {
			e, err := c.GetOrMint(t.Context(), key, m.mint)
			if err != nil || e.Token() != "jwt-1" {
				t.Fatalf("later GetOrMint = %q, %v; want jwt-1", e.Token(), err)
			}
		}
		if got := m.calls.Load(); got != 1 {
			t.Errorf("mint called %d times after the cache was warm, want 1", got)
		}
	})
}

func TestGetOrMintKeysAreIndependent(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := replicas(t, b, newTransit(t), 1, Options{})[0]
		keys := []Key{
			{Tenant: "acme", Credential: "c1", Generation: "g1", BaseURL: "https://up.example", Kind: jwtKind},
			{Tenant: "acme", Credential: "c1", Generation: "g2", BaseURL: "https://up.example", Kind: jwtKind},
			{Tenant: "acme", Credential: "c1", Generation: "g1", BaseURL: "https://other.example", Kind: jwtKind},
			{Tenant: "acme", Credential: "c1", Generation: "g1", BaseURL: "https://up.example", Kind: eidKind},
			{Tenant: "acme", Credential: "c2", Generation: "g1", BaseURL: "https://up.example", Kind: jwtKind},
			{Tenant: "globex", Credential: "c1", Generation: "g1", BaseURL: "https://up.example", Kind: jwtKind},
		}
		m := newMinter("tok")
		seen := map[string]Key{}
		for range 2 {
			for _, k := range keys {
				e, err := c.GetOrMint(t.Context(), k, m.mint)
				if err != nil {
					t.Fatal(err)
				}
				if other, ok := seen[e.Token()]; ok && other != k {
					t.Fatalf("keys %+v and %+v share token %q", k, other, e.Token())
				}
				seen[e.Token()] = k
				if e.Key() != k {
					t.Fatalf("Entry.Key() = %+v, want %+v", e.Key(), k)
				}
			}
		}
		if got := m.calls.Load(); got != int64(len(keys)) {
			t.Errorf("mint called %d times for %d keys asked twice, want %d", got, len(keys), len(keys))
		}
	})
}

func TestGetOrMintRemintsAfterTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		caches := replicas(t, b, newTransit(t), 2, Options{})
		m := newMinter("eid")
		m.ttl = time.Second
		key := Key{Tenant: "acme", Credential: "wialon-1", Generation: "g3", BaseURL: "https://up.example", Kind: eidKind}

		get := func(c *Cache, want string) {
			t.Helper()
			e, err := c.GetOrMint(t.Context(), key, m.mint)
			if err != nil {
				t.Fatal(err)
			}
			if e.Token() != want {
				t.Fatalf("token %q, want %q", e.Token(), want)
			}
		}
		get(caches[0], "eid-1")
		get(caches[1], "eid-1")
		b.advance(1100 * time.Millisecond)
		get(caches[1], "eid-2")
		get(caches[0], "eid-2")
		if got := m.calls.Load(); got != 2 {
			t.Errorf("mint called %d times, want 2 (once, and once more after expiry)", got)
		}
	})
}

func TestInvalidate(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		key := testKey("acme", "fleetup-1")

		t.Run("failed entry is dropped, one new mint for all", func(t *testing.T) {
			b := b.fresh(t)
			caches := replicas(t, b, newTransit(t), 3, Options{WaitPoll: 5 * time.Millisecond})
			m := newMinter("jwt")
			failed, err := caches[0].GetOrMint(t.Context(), key, m.mint)
			if err != nil {
				t.Fatal(err)
			}
			// Every caller got a 401 with the same token: each one
			// invalidates it and asks again.
			m.delay = 50 * time.Millisecond
			var wg sync.WaitGroup
			tokens := make([]string, 60)
			for i := range tokens {
				wg.Go(func() {
					c := caches[i%len(caches)]
					if err := c.Invalidate(t.Context(), failed); err != nil {
						t.Error(err)
						return
					}
					e, err := c.GetOrMint(t.Context(), key, m.mint)
					if err != nil {
						t.Error(err)
						return
					}
					tokens[i] = e.Token()
				})
			}
			wg.Wait()
			for i, tok := range tokens {
				if tok != "jwt-2" {
					t.Fatalf("caller %d after invalidation got %q, want jwt-2", i, tok)
				}
			}
			if got := m.calls.Load(); got != 2 {
				t.Errorf("mint called %d times, want 2", got)
			}
			if got := totalStats(caches...).Invalidations; got != 1 {
				t.Errorf("%d invalidations dropped a token, want 1", got)
			}
		})

		t.Run("stale entry keeps the newer token", func(t *testing.T) {
			b := b.fresh(t)
			caches := replicas(t, b, newTransit(t), 2, Options{})
			a, other := caches[0], caches[1]
			m := newMinter("jwt")
			stale, err := a.GetOrMint(t.Context(), key, m.mint)
			if err != nil {
				t.Fatal(err)
			}
			// The other replica saw the 401 first and re-minted.
			if err := other.Invalidate(t.Context(), stale); err != nil {
				t.Fatal(err)
			}
			fresh, err := other.GetOrMint(t.Context(), key, m.mint)
			if err != nil || fresh.Token() != "jwt-2" {
				t.Fatalf("re-mint = %q, %v; want jwt-2", fresh.Token(), err)
			}
			// Now a reports its stale failure.
			if err := a.Invalidate(t.Context(), stale); err != nil {
				t.Fatal(err)
			}
			got, err := a.GetOrMint(t.Context(), key, m.mint)
			if err != nil || got.Token() != "jwt-2" {
				t.Fatalf("after stale Invalidate: %q, %v; want jwt-2 kept", got.Token(), err)
			}
			if n := m.calls.Load(); n != 2 {
				t.Errorf("mint called %d times, want 2", n)
			}
		})

		t.Run("zero entry", func(t *testing.T) {
			b := b.fresh(t)
			c := replicas(t, b, newTransit(t), 1, Options{})[0]
			if err := c.Invalidate(t.Context(), Entry{}); !errors.Is(err, ErrZeroEntry) {
				t.Fatalf("Invalidate(Entry{}) = %v, want ErrZeroEntry", err)
			}
		})
	})
}

var errUpstream = errors.New("upstream said no")

func TestMintErrorReachesEveryWaiter(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tests := []struct {
			name     string
			replicas int
			// maxMints: waiters in one process share the failing flight;
			// a waiter on another replica sees the lock go without a
			// token and tries once itself.
			maxMints int64
		}{
			{"one replica", 1, 1},
			{"three replicas", 3, 3},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				b := b.fresh(t)
				caches := replicas(t, b, newTransit(t), tt.replicas, Options{WaitPoll: 5 * time.Millisecond})
				key := testKey("acme", "bad-secret")
				const callers = 50
				var calls atomic.Int64
				var arrived sync.WaitGroup
				arrived.Add(callers)
				failing := func(ctx context.Context) (string, time.Duration, error) {
					calls.Add(1)
					// Fail only once every caller is queued behind us.
					arrived.Wait()
					time.Sleep(100 * time.Millisecond)
					return "", 0, errUpstream
				}
				var wg sync.WaitGroup
				errs := make([]error, callers)
				for i := range callers {
					wg.Go(func() {
						arrived.Done()
						_, errs[i] = caches[i%len(caches)].GetOrMint(t.Context(), key, failing)
					})
				}
				wg.Wait()
				for i, err := range errs {
					if !errors.Is(err, errUpstream) {
						t.Fatalf("caller %d: error %v, want errUpstream", i, err)
					}
				}
				if n := calls.Load(); n < 1 || n > tt.maxMints {
					t.Errorf("failing mint called %d times, want 1..%d", n, tt.maxMints)
				}
				if s := totalStats(caches...); s.MintErrors != calls.Load() {
					t.Errorf("stats %+v: MintErrors should equal the %d mint calls", s, calls.Load())
				}
				assertNoToken(t, caches[0], key)

				// Nothing was cached: the next call mints.
				m := newMinter("jwt")
				e, err := caches[0].GetOrMint(t.Context(), key, m.mint)
				if err != nil || e.Token() != "jwt-1" || m.calls.Load() != 1 {
					t.Fatalf("after the failure: %q, %v, %d mints; want jwt-1 from one mint", e.Token(), err, m.calls.Load())
				}
			})
		}
	})
}

func assertNoToken(t *testing.T, c *Cache, key Key) {
	t.Helper()
	n := c.names(key)
	for _, name := range []string{n.token, n.lock} {
		if err := c.client.Get(t.Context(), name).Err(); !errors.Is(err, redis.Nil) {
			t.Errorf("GET %s: %v, want no such key", name, err)
		}
	}
}

func TestLockHolderCrash(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		const lockTTL = 500 * time.Millisecond
		c := replicas(t, b, newTransit(t), 1, Options{LockTTL: lockTTL, WaitPoll: 5 * time.Millisecond})[0]
		key := testKey("acme", "fleetup-1")
		// A replica took the lock and died before minting.
		if err := c.client.Set(t.Context(), c.names(key).lock, "dead-replica", lockTTL).Err(); err != nil {
			t.Fatal(err)
		}
		m := newMinter("jwt")
		type result struct {
			e   Entry
			err error
		}
		done := make(chan result, 1)
		started := time.Now()
		go func() {
			e, err := c.GetOrMint(t.Context(), key, m.mint)
			done <- result{e, err}
		}()

		waitUntil(t, 2*time.Second, "the caller to wait on the lock", func() bool { return c.Stats().LockWaits >= 1 })
		time.Sleep(50 * time.Millisecond)
		if n := m.calls.Load(); n != 0 {
			t.Fatalf("minted %d times while another replica held the lock", n)
		}
		b.advance(lockTTL)

		select {
		case r := <-done:
			if r.err != nil || r.e.Token() != "jwt-1" {
				t.Fatalf("GetOrMint = %q, %v; want jwt-1", r.e.Token(), r.err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("GetOrMint still waiting 5s after the lock expired")
		}
		if elapsed := time.Since(started); b.realTime && elapsed < lockTTL-100*time.Millisecond {
			t.Errorf("minted after %s, before the dead lock (TTL %s) expired", elapsed, lockTTL)
		}
		if n := m.calls.Load(); n != 1 {
			t.Errorf("mint called %d times, want 1", n)
		}
	})
}

// A replica that missed, but got the lock only after another replica had
// minted and released it, must use that token rather than mint again.
func TestRecheckAfterLock(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		caches := replicas(t, b, newTransit(t), 2, Options{})
		slow, fast := caches[0], caches[1]
		key := testKey("acme", "fleetup-1")
		m := newMinter("jwt")
		slow.testHookMiss = func() {
			if _, err := fast.GetOrMint(t.Context(), key, m.mint); err != nil {
				t.Error(err)
			}
		}
		e, err := slow.GetOrMint(t.Context(), key, m.mint)
		if err != nil || e.Token() != "jwt-1" {
			t.Fatalf("GetOrMint = %q, %v; want jwt-1 minted by the other replica", e.Token(), err)
		}
		if n := m.calls.Load(); n != 1 {
			t.Errorf("mint called %d times, want 1", n)
		}
	})
}

// A caller that gives up must not fail the others sharing its flight.
func TestCallerCancelDoesNotFailSharedFlight(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := replicas(t, b, newTransit(t), 1, Options{})[0]
		key := testKey("acme", "fleetup-1")
		release := make(chan struct{})
		var calls atomic.Int64
		mint := func(ctx context.Context) (string, time.Duration, error) {
			calls.Add(1)
			select {
			case <-release:
				return "jwt-1", time.Minute, nil
			case <-ctx.Done():
				return "", 0, ctx.Err()
			}
		}
		first, cancelFirst := context.WithCancel(t.Context())
		firstErr := make(chan error, 1)
		go func() {
			_, err := c.GetOrMint(first, key, mint)
			firstErr <- err
		}()
		waitUntil(t, 2*time.Second, "the mint to start", func() bool { return calls.Load() == 1 })

		second := make(chan Entry, 1)
		go func() {
			e, err := c.GetOrMint(t.Context(), key, mint)
			if err != nil {
				t.Error(err)
			}
			second <- e
		}()
		cancelFirst()
		select {
		case err := <-firstErr:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled caller got %v, want context.Canceled", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("cancelled caller did not return")
		}
		close(release)
		if e := <-second; e.Token() != "jwt-1" {
			t.Fatalf("second caller got %q, want jwt-1", e.Token())
		}
		if n := calls.Load(); n != 1 {
			t.Errorf("mint called %d times, want 1", n)
		}
	})
}

func TestMintMisbehaviour(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tests := []struct {
			name string
			mint MintFunc
			want error // nil: any non-nil error
		}{
			{"zero TTL", func(context.Context) (string, time.Duration, error) { return "jwt", 0, nil }, ErrBadTTL},
			{"sub-millisecond TTL", func(context.Context) (string, time.Duration, error) { return "jwt", time.Microsecond, nil }, ErrBadTTL},
			{"panic", func(context.Context) (string, time.Duration, error) { panic("boom") }, nil},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				b := b.fresh(t)
				c := replicas(t, b, newTransit(t), 1, Options{})[0]
				key := testKey("acme", "fleetup-1")
				_, err := c.GetOrMint(t.Context(), key, tt.mint)
				if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
					t.Fatalf("GetOrMint error = %v, want %v", err, tt.want)
				}
				assertNoToken(t, c, key)
				if s := c.Stats(); s.Mints != 1 {
					t.Errorf("stats %+v, want Mints 1", s)
				}
			})
		}
	})
}

func TestInvalidKeys(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := replicas(t, b, newTransit(t), 1, Options{})[0]
		valid := testKey("acme", "c1")
		tests := []struct {
			name   string
			change func(k *Key)
		}{
			{"empty tenant", func(k *Key) { k.Tenant = "" }},
			{"empty credential", func(k *Key) { k.Credential = "" }},
			{"empty kind", func(k *Key) { k.Kind = "" }},
			{"empty generation", func(k *Key) { k.Generation = "" }},
			{"empty base URL", func(k *Key) { k.BaseURL = "" }},
			{"colon in generation", func(k *Key) { k.Generation = "g1:x" }},
			{"colon in credential", func(k *Key) { k.Credential = "c1:2" }},
			{"brace in tenant", func(k *Key) { k.Tenant = "ac}me" }},
			{"brace in kind", func(k *Key) { k.Kind = "{x" }},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				k := valid
				tt.change(&k)
				m := newMinter("x")
				if _, err := c.GetOrMint(t.Context(), k, m.mint); !errors.Is(err, ErrInvalidKey) {
					t.Fatalf("GetOrMint(%+v) = %v, want ErrInvalidKey", k, err)
				}
				if m.calls.Load() != 0 {
					t.Fatal("minted for an invalid key")
				}
			})
		}
	})
}

func TestNewRejectsBracedPrefix(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("New accepted a prefix with a brace")
		}
	}()
	New(redis.NewClient(&redis.Options{}), newTransit(t), Options{Prefix: "fb:{gw}"})
}

func BenchmarkGetOrMintHit(b *testing.B) {
	kr, err := transit.NewKeyring()
	if err != nil {
		b.Fatal(err)
	}
	c := New(testenv.Redis(b).Client(b), kr, Options{Prefix: testenv.RedisPrefix(b)})
	key := testKey("acme", "c1")
	mint := func(context.Context) (string, time.Duration, error) { return "jwt", time.Hour, nil }
	if _, err := c.GetOrMint(b.Context(), key, mint); err != nil {
		b.Fatal(err)
	}
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.GetOrMint(context.Background(), key, mint); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if s := c.Stats(); s.Mints != 1 {
		b.Errorf("stats %+v, want one mint", s)
	}
}
