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
		// A wrapped key planted under another tenant makes that tenant's
		// calls fail rather than seal with a key it cannot vouch for.
		if err := c.client.Set(ctx, tenantDataKeyName(b.prefix, "initech"), wrapped, 0).Err(); err != nil {
			t.Fatal(err)
		}
		m := newMinter("jwt")
		if _, err := c.GetOrMint(ctx, testKey("initech", "c1"), m.mint); !errors.Is(err, transit.ErrDecrypt) {
			t.Fatalf("GetOrMint with a planted data key: %v, want transit.ErrDecrypt", err)
		}
		if m.calls.Load() != 0 {
			t.Fatal("minted although no data key could seal the token")
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
