package tokencache

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// countingTransit counts data key calls, to prove each process unwraps a
// tenant's key once.
type countingTransit struct {
	transit.Transit
	generated, unwrapped atomic.Int64
}

func (c *countingTransit) GenerateDataKey(ctx context.Context, tenant string) (transit.DataKey, error) {
	c.generated.Add(1)
	return c.Transit.GenerateDataKey(ctx, tenant)
}

func (c *countingTransit) UnwrapDataKey(ctx context.Context, tenant, wrapped string) ([]byte, error) {
	c.unwrapped.Add(1)
	return c.Transit.UnwrapDataKey(ctx, tenant, wrapped)
}

func canary(t *testing.T) string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "CANARY" + base64.RawURLEncoding.EncodeToString(b)
}

// The plaintext token appears in no Redis key or value, no log line and no
// formatting of an Entry.
func TestNoPlaintextAtRest(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		secret := canary(t)
		var logs syncBuffer
		caches := replicas(t, b, newTransit(t), 2, Options{Logger: debugLogger(&logs), WaitPoll: 5 * time.Millisecond})
		mint := func(context.Context) (string, time.Duration, error) { return secret, time.Minute, nil }

		var entries []Entry
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, tenant := range []string{"acme", "globex"} {
			for _, cred := range []string{"c1", "c2"} {
				for _, c := range caches {
					wg.Go(func() {
						e, err := c.GetOrMint(t.Context(), testKey(tenant, cred), mint)
						if err != nil {
							t.Error(err)
							return
						}
						mu.Lock()
						entries = append(entries, e)
						mu.Unlock()
					})
				}
			}
		}
		wg.Wait()
		if len(entries) != 8 || entries[0].Token() != secret {
			t.Fatalf("got %d entries, want 8 carrying the canary", len(entries))
		}
		// Exercise the logging of Invalidate too.
		if err := caches[0].Invalidate(t.Context(), entries[0]); err != nil {
			t.Fatal(err)
		}

		values := allValues(t, caches[0].client)
		tokens := 0
		for k, v := range values {
			if strings.Contains(k, secret) || strings.Contains(v, secret) {
				t.Errorf("Redis key %q holds the plaintext token", k)
			}
			if strings.HasPrefix(k, b.prefix+":") && strings.Contains(k, ":tok:") {
				tokens++
				if !strings.HasPrefix(v, sealedFormat+":") {
					t.Errorf("token key %q holds %q, not a sealed value", k, v)
				}
			}
		}
		if tokens != 3 {
			t.Errorf("found %d token keys, want 3 (4 cached, 1 invalidated)", tokens)
		}
		if logs.String() == "" {
			t.Fatal("no debug logs written; the log check would prove nothing")
		}
		if strings.Contains(logs.String(), secret) {
			t.Errorf("logs contain the plaintext token:\n%s", logs.String())
		}
		assertEntryHidesToken(t, entries[0], secret)
	})
}

func assertEntryHidesToken(t *testing.T, e Entry, secret string) {
	t.Helper()
	var shown []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		shown = append(shown, fmt.Sprintf(verb, e), fmt.Sprintf(verb, &e), fmt.Sprintf(verb, []Entry{e}))
	}
	js, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	slog.New(slog.NewTextHandler(&logs, nil)).Info("entry", "e", e)
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("entry", "e", e)
	shown = append(shown, string(js), logs.String())
	for _, s := range shown {
		if strings.Contains(s, secret) {
			t.Errorf("an Entry formats as %q, which contains the token", s)
		}
	}
	if !strings.Contains(fmt.Sprint(e), "credential="+e.Key().Credential) {
		t.Errorf("fmt.Sprint(Entry) = %q, want it to name the credential", fmt.Sprint(e))
	}
}

// A value copied to another key name does not decrypt (the key name is the
// GCM associated data), so it is minted over, never served.
func TestValueBoundToKeyName(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		c := replicas(t, b, newTransit(t), 1, Options{})[0]
		src, dst := testKey("acme", "c1"), testKey("acme", "c2")
		m := newMinter("jwt")
		if _, err := c.GetOrMint(t.Context(), src, m.mint); err != nil {
			t.Fatal(err)
		}
		stored, err := c.client.Get(t.Context(), c.names(src).token).Result()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.client.Set(t.Context(), c.names(dst).token, stored, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		e, err := c.GetOrMint(t.Context(), dst, m.mint)
		if err != nil {
			t.Fatal(err)
		}
		if e.Token() != "jwt-2" || m.calls.Load() != 2 {
			t.Fatalf("copied value: got %q after %d mints; want a fresh jwt-2", e.Token(), m.calls.Load())
		}

		// The same at the cipher level.
		dk, err := c.keys.current(t.Context(), "acme")
		if err != nil {
			t.Fatal(err)
		}
		_, sealed, err := parseSealed(stored)
		if err != nil {
			t.Fatal(err)
		}
		if tok, err := open(dk, c.names(src).token, sealed); err != nil || tok != "jwt-1" {
			t.Fatalf("open under its own name = %q, %v; want jwt-1", tok, err)
		}
		if _, err := open(dk, c.names(dst).token, sealed); !errors.Is(err, errUndecryptable) {
			t.Fatalf("open under another name: %v, want errUndecryptable", err)
		}
	})
}

func TestTenantsHaveSeparateDataKeys(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := newTransit(t)
		c := replicas(t, b, tr, 1, Options{})[0]
		ctx := t.Context()
		acme, err := c.keys.current(ctx, "acme")
		if err != nil {
			t.Fatal(err)
		}
		globex, err := c.keys.current(ctx, "globex")
		if err != nil {
			t.Fatal(err)
		}
		if acme.id == globex.id {
			t.Fatal("two tenants share a data key")
		}
		name := c.names(testKey("acme", "c1")).token
		stored, err := seal(acme, name, "jwt-acme")
		if err != nil {
			t.Fatal(err)
		}
		_, sealed, err := parseSealed(stored)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := open(globex, name, sealed); !errors.Is(err, errUndecryptable) {
			t.Fatalf("another tenant's data key opened the value: %v", err)
		}

		// Nor can the other tenant unwrap acme's data key: transit
		// derives its key from the tenant.
		wrapped, err := c.client.Get(ctx, tenantDataKeyName(b.prefix, "acme")).Result()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tr.UnwrapDataKey(ctx, "globex", wrapped); err == nil {
			t.Fatal("globex unwrapped acme's data key")
		}
		// A wrapped key planted under another tenant does not unwrap for
		// it, so it is replaced by a key transit made for that tenant: the
		// planted key never seals or opens anything.
		dkName := tenantDataKeyName(b.prefix, "initech")
		if err := c.client.Set(ctx, dkName, wrapped, 0).Err(); err != nil {
			t.Fatal(err)
		}
		m := newMinter("jwt")
		if _, err := c.GetOrMint(ctx, testKey("initech", "c1"), m.mint); err != nil {
			t.Fatalf("GetOrMint with a planted data key: %v", err)
		}
		replacement, err := c.client.Get(ctx, dkName).Result()
		if err != nil {
			t.Fatal(err)
		}
		if replacement == wrapped {
			t.Fatal("the planted data key is still in place")
		}
		if _, err := tr.UnwrapDataKey(ctx, "initech", replacement); err != nil {
			t.Fatalf("the replacement is not initech's own key: %v", err)
		}
		sealedToken, err := c.client.Get(ctx, c.names(testKey("initech", "c1")).token).Result()
		if err != nil {
			t.Fatal(err)
		}
		if id, _, _ := parseSealed(sealedToken); id != wrappedID(replacement) || id == acme.id {
			t.Fatalf("initech's token is sealed with key %s, want its replacement %s", id, wrappedID(replacement))
		}
		if got := c.Stats().DataKeyReplacements; got != 1 {
			t.Errorf("DataKeyReplacements = %d, want 1", got)
		}
	})
}

// switchableTransit is one transit whose backend can be swapped, as a Vault
// that restarts without its keys (a dev server, a restore without the
// transit key) swaps the key material under every replica at once.
type switchableTransit struct {
	mu sync.RWMutex
	t  transit.Transit
}

func (s *switchableTransit) get() transit.Transit {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.t
}

func (s *switchableTransit) swap(t transit.Transit) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t = t
}

func (s *switchableTransit) Encrypt(ctx context.Context, tenant string, items []transit.Item) ([]string, error) {
	return s.get().Encrypt(ctx, tenant, items)
}

func (s *switchableTransit) Decrypt(ctx context.Context, tenant string, items []transit.Item) ([][]byte, error) {
	return s.get().Decrypt(ctx, tenant, items)
}

func (s *switchableTransit) Rewrap(ctx context.Context, tenant string, items []transit.Item) ([]string, error) {
	return s.get().Rewrap(ctx, tenant, items)
}

func (s *switchableTransit) GenerateDataKey(ctx context.Context, tenant string) (transit.DataKey, error) {
	return s.get().GenerateDataKey(ctx, tenant)
}

func (s *switchableTransit) UnwrapDataKey(ctx context.Context, tenant, wrapped string) ([]byte, error) {
	return s.get().UnwrapDataKey(ctx, tenant, wrapped)
}

func (s *switchableTransit) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	return s.get().HMAC(ctx, data)
}

// downTransit is a transit that cannot be reached (Vault down or sealed).
type downTransit struct{ transit.Transit }

func (downTransit) GenerateDataKey(context.Context, string) (transit.DataKey, error) {
	return transit.DataKey{}, fmt.Errorf("vault down: %w", transit.ErrUnavailable)
}

func (downTransit) UnwrapDataKey(context.Context, string, string) ([]byte, error) {
	return nil, fmt.Errorf("vault down: %w", transit.ErrUnavailable)
}

// TestDataKeyReplacedWhenTransitKeyLost: after the transit key is lost
// (Vault restarted with new key material), a replica that holds the old
// data key in memory keeps serving its cached tokens; cold replicas replace
// the data key that no longer unwraps — exactly one of them, however many
// race — mint over the tokens sealed with the old key, and every replica
// converges on the new key. No token sealed with one key is ever returned
// as read with another: every token returned is the one its key sealed.
func TestDataKeyReplacedWhenTransitKeyLost(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := &switchableTransit{t: newTransit(t)}
		warm := replicas(t, b, tr, 1, Options{WaitPoll: 5 * time.Millisecond})[0]
		m := newMinter("jwt")
		const creds = 4
		for i := range creds {
			if e, err := warm.GetOrMint(t.Context(), testKey("acme", fmt.Sprint("c", i)), m.mint); err != nil || e.Token() != fmt.Sprint("jwt-", i+1) {
				t.Fatalf("before the loss: %q, %v", e.Token(), err)
			}
		}
		dkName := tenantDataKeyName(b.prefix, "acme")
		oldWrapped, err := warm.client.Get(t.Context(), dkName).Result()
		if err != nil {
			t.Fatal(err)
		}

		tr.swap(newTransit(t)) // Vault comes back without the old key

		// The warm replica still reads what it cached, without transit.
		if e, err := warm.GetOrMint(t.Context(), testKey("acme", "c0"), m.mint); err != nil || e.Token() != "jwt-1" {
			t.Fatalf("warm replica after the loss: %q, %v; want the cached jwt-1", e.Token(), err)
		}

		// Cold replicas race: each must end up with a working token.
		cold := replicas(t, b, tr, 3, Options{WaitPoll: 5 * time.Millisecond})
		var wg sync.WaitGroup
		tokens := make([][]string, len(cold))
		for i, c := range cold {
			tokens[i] = make([]string, creds)
			for j := range creds {
				wg.Go(func() {
					e, err := c.GetOrMint(t.Context(), testKey("acme", fmt.Sprint("c", j)), m.mint)
					if err != nil {
						t.Errorf("cold replica %d, c%d: %v", i, j, err)
						return
					}
					tokens[i][j] = e.Token()
				})
			}
		}
		wg.Wait()
		if got := totalStats(cold...).DataKeyReplacements; got != 1 {
			t.Errorf("%d replacements by racing replicas, want exactly 1", got)
		}
		newWrapped, err := warm.client.Get(t.Context(), dkName).Result()
		if err != nil || newWrapped == oldWrapped {
			t.Fatalf("data key in Redis after recovery: changed=%v, %v", newWrapped != oldWrapped, err)
		}
		for i, c := range cold {
			if k := c.keys.cached("acme"); k == nil || k.id != wrappedID(newWrapped) {
				t.Errorf("cold replica %d does not hold the new data key", i)
			}
			for j, tok := range tokens[i] {
				// Minted after the loss: the old tokens (jwt-1..4) were
				// sealed with the lost key and must not come back.
				if tok == fmt.Sprint("jwt-", j+1) {
					t.Errorf("cold replica %d got the token sealed with the lost key for c%d", i, j)
				}
			}
		}
		if n := m.calls.Load(); n != 2*creds {
			t.Errorf("%d mints, want %d: one per credential before the loss and one after", n, 2*creds)
		}

		// The warm replica meets a token sealed with the new key and
		// converges on it, without replacing anything.
		if e, err := warm.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); err != nil || e.Token() != tokens[0][1] {
			t.Fatalf("warm replica reading the new token: %q, %v; want %q", e.Token(), err, tokens[0][1])
		}
		if k := warm.keys.cached("acme"); k == nil || k.id != wrappedID(newWrapped) {
			t.Error("the warm replica did not move to the new data key")
		}
		if got := warm.Stats().DataKeyReplacements; got != 0 {
			t.Errorf("the warm replica replaced the data key %d times, want 0", got)
		}
	})
}

// TestDataKeyNotReplacedWhileTransitDown: a data key that cannot be
// unwrapped because Vault is unreachable or sealed is kept: the call fails
// with ErrUnavailable and Redis is untouched.
func TestDataKeyNotReplacedWhileTransitDown(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := newTransit(t)
		c := replicas(t, b, tr, 1, Options{})[0]
		m := newMinter("jwt")
		if _, err := c.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); err != nil {
			t.Fatal(err)
		}
		dkName := tenantDataKeyName(b.prefix, "acme")
		before, err := c.client.Get(t.Context(), dkName).Result()
		if err != nil {
			t.Fatal(err)
		}
		cold := replicas(t, b, downTransit{tr}, 1, Options{})[0]
		if _, err := cold.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); !errors.Is(err, transit.ErrUnavailable) {
			t.Fatalf("GetOrMint with Vault down: %v, want transit.ErrUnavailable", err)
		}
		if after, err := c.client.Get(t.Context(), dkName).Result(); err != nil || after != before {
			t.Fatalf("the data key changed while Vault was down (%v)", err)
		}
		if got := cold.Stats().DataKeyReplacements; got != 0 {
			t.Errorf("DataKeyReplacements = %d, want 0", got)
		}
		if n := m.calls.Load(); n != 1 {
			t.Errorf("%d mints, want 1: nothing is minted without a data key", n)
		}
	})
}

// TestDataKeyReplacedAtMostOncePerInterval: a process does not replace a
// tenant's data key again right after it replaced it (a replica pointed at
// the wrong Vault must not make the fleet mint again on every call); the
// call fails with ErrDecrypt and Redis keeps what it holds.
func TestDataKeyReplacedAtMostOncePerInterval(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := &switchableTransit{t: newTransit(t)}
		c := replicas(t, b, tr, 1, Options{})[0]
		m := newMinter("jwt")
		if _, err := c.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); err != nil {
			t.Fatal(err)
		}
		dkName := tenantDataKeyName(b.prefix, "acme")
		first, err := c.client.Get(t.Context(), dkName).Result()
		if err != nil {
			t.Fatal(err)
		}
		tokName := c.names(testKey("acme", "c1")).token
		firstToken, err := c.client.Get(t.Context(), tokName).Result()
		if err != nil {
			t.Fatal(err)
		}
		tr.swap(newTransit(t))
		fresh := replicas(t, b, tr, 1, Options{})[0]
		if _, err := fresh.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); err != nil {
			t.Fatal(err)
		}
		// The old key and a token sealed with it come back into Redis, and
		// the key material changes again: within the interval, no second
		// replacement.
		if err := c.client.Set(t.Context(), dkName, first, 0).Err(); err != nil {
			t.Fatal(err)
		}
		if err := c.client.Set(t.Context(), tokName, firstToken, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		tr.swap(newTransit(t))
		if _, err := fresh.GetOrMint(t.Context(), testKey("acme", "c1"), m.mint); !errors.Is(err, transit.ErrDecrypt) {
			t.Fatalf("second replacement within the interval: %v, want transit.ErrDecrypt", err)
		}
		if after, err := c.client.Get(t.Context(), dkName).Result(); err != nil || after != first {
			t.Fatalf("the data key was replaced again within the interval (%v)", err)
		}
		if got := fresh.Stats().DataKeyReplacements; got != 1 {
			t.Errorf("DataKeyReplacements = %d, want 1", got)
		}
	})
}

// All replicas converge on one data key per tenant, each unwrapping it at
// most once, and read each other's tokens.
func TestDataKeyConvergesAcrossReplicas(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		const n = 3
		trs := make([]*countingTransit, n)
		caches := make([]*Cache, n)
		shared := newTransit(t)
		for i := range caches {
			trs[i] = &countingTransit{Transit: shared}
			caches[i] = New(b.newClient(t), trs[i], Options{Prefix: b.prefix, WaitPoll: 5 * time.Millisecond})
		}
		m := newMinter("jwt")
		// Different credentials, so no flight is shared and every
		// replica races to create the data key.
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i, c := range caches {
			for j := range 10 {
				wg.Go(func() {
					<-start
					if _, err := c.GetOrMint(t.Context(), testKey("acme", fmt.Sprintf("c%d-%d", i, j)), m.mint); err != nil {
						t.Error(err)
					}
				})
			}
		}
		close(start)
		wg.Wait()

		wrapped, err := caches[0].client.Get(t.Context(), tenantDataKeyName(b.prefix, "acme")).Result()
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range caches {
			if k := c.keys.cached("acme"); k == nil || k.id != wrappedID(wrapped) {
				t.Errorf("replica %d does not hold the data key stored in Redis", i)
			}
			if u := trs[i].unwrapped.Load(); u > 1 {
				t.Errorf("replica %d unwrapped the data key %d times, want at most 1", i, u)
			}
		}
		// Every replica reads every other replica's tokens.
		before := m.calls.Load()
		for _, c := range caches {
			for i := range n {
				if _, err := c.GetOrMint(t.Context(), testKey("acme", fmt.Sprintf("c%d-0", i)), m.mint); err != nil {
					t.Fatal(err)
				}
			}
		}
		if after := m.calls.Load(); after != before || before != n*10 {
			t.Errorf("mints: %d for %d keys, then %d more on cross-replica reads; want %d and 0", before, n*10, after-before, n*10)
		}
	})
}

// If the wrapped data key disappears from Redis (flush, eviction), replicas
// make a new one, mint over values they cannot open, and recover.
func TestDataKeyReplaced(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := newTransit(t)
		old := replicas(t, b, tr, 1, Options{})[0]
		key := testKey("acme", "c1")
		m := newMinter("jwt")
		if _, err := old.GetOrMint(t.Context(), key, m.mint); err != nil {
			t.Fatal(err)
		}
		if err := old.client.Del(t.Context(), tenantDataKeyName(b.prefix, "acme")).Err(); err != nil {
			t.Fatal(err)
		}
		fresh := replicas(t, b, tr, 1, Options{})[0]
		e, err := fresh.GetOrMint(t.Context(), key, m.mint)
		if err != nil || e.Token() != "jwt-2" {
			t.Fatalf("new replica: %q, %v; want jwt-2 minted over the unreadable value", e.Token(), err)
		}
		e, err = old.GetOrMint(t.Context(), key, m.mint)
		if err != nil || e.Token() != "jwt-2" {
			t.Fatalf("old replica: %q, %v; want jwt-2 read with the reloaded data key", e.Token(), err)
		}
		if n := m.calls.Load(); n != 2 {
			t.Errorf("mint called %d times, want 2", n)
		}
	})
}
