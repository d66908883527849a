package tokencache

import (
	"context"
	"testing"
	"time"
)

// With LocalTTL a hot token is served from memory — no Redis read — until
// the TTL passes or Invalidate drops it; Invalidate still compares against
// Redis, and the next call mints once.
func TestLocalTTL(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		c := replicas(t, b, newTransit(t), 1, Options{LocalTTL: 300 * time.Millisecond})[0]
		m := &minter{name: "local", ttl: time.Minute}
		key := Key{Tenant: "acme", Credential: "c", Generation: "g1", BaseURL: "https://up.example", Kind: jwtKind}
		first, err := c.GetOrMint(ctx, key, m.mint)
		if err != nil {
			t.Fatal(err)
		}
		// Remove the token from Redis behind the cache's back: a memory hit
		// still returns it, which proves no Redis read happened.
		if err := b.newClient(t).Del(ctx, c.names(key).token).Err(); err != nil {
			t.Fatal(err)
		}
		again, err := c.GetOrMint(ctx, key, m.mint)
		if err != nil || again.Token() != first.Token() || m.calls.Load() != 1 {
			t.Fatalf("within LocalTTL: token changed or minted again (%d mints, %v)", m.calls.Load(), err)
		}
		time.Sleep(350 * time.Millisecond)
		later, err := c.GetOrMint(ctx, key, m.mint)
		if err != nil || later.Token() == first.Token() || m.calls.Load() != 2 {
			t.Fatalf("after LocalTTL: want a fresh mint from Redis's miss, got %d mints, %v", m.calls.Load(), err)
		}
		if err := c.Invalidate(ctx, later); err != nil {
			t.Fatal(err)
		}
		fresh, err := c.GetOrMint(ctx, key, m.mint)
		if err != nil || fresh.Token() == later.Token() || m.calls.Load() != 3 {
			t.Fatalf("after Invalidate: want exactly one more mint, got %d, %v", m.calls.Load(), err)
		}
	})
}
