package handle

import (
	"errors"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

func TestLegacyWindow(t *testing.T) {
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = client.Close() })
	ctx := t.Context()
	clock := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	newWindow := func() *LegacyWindow {
		w := NewLegacyWindow(client, "fb")
		w.now = func() time.Time { return clock }
		return w
	}
	keys := testKeys(t, 1)
	legacy, _, _ := NewLegacy()
	keyed, _, _ := keys.New()
	gateway := newWindow()
	verify := func(w *LegacyWindow, h string) error {
		_, err := Verifier{Keys: keys, Legacy: w}.Verify(ctx, h)
		return err
	}

	// No keyed issuer yet: legacy handles are accepted.
	if !gateway.Accepts(ctx) || verify(gateway, legacy) != nil {
		t.Fatal("legacy handle refused before any issuer closed the window")
	}
	issuer := newWindow()
	until, err := issuer.Close(ctx, 2*time.Hour)
	if err != nil || !until.Equal(clock.Add(2*time.Hour)) {
		t.Fatalf("Close = %v, %v; want now+2h", until, err)
	}
	// A later replica (a restart) does not move the time.
	clock = clock.Add(10 * time.Minute)
	if again, err := newWindow().Close(ctx, 2*time.Hour); err != nil || !again.Equal(until) {
		t.Fatalf("second Close = %v, %v; want the first time %v", again, err, until)
	}

	// The gateway read "absent" 10 minutes ago: stale, so it reads again.
	if !gateway.Accepts(ctx) || verify(gateway, legacy) != nil {
		t.Fatal("legacy handle refused inside the window")
	}
	clock = until
	reads := m.CommandCount()
	if verify(gateway, legacy) == nil {
		t.Fatal("legacy handle accepted after the window; a forged CRC32 handle would stay free forever")
	}
	if err := verify(gateway, keyed); err != nil {
		t.Fatalf("keyed handle after the window: %v", err)
	}
	// Once closed, the answer is final and costs no Redis read.
	for range 10 {
		if gateway.Accepts(ctx) {
			t.Fatal("the window reopened")
		}
	}
	if got := m.CommandCount() - reads; got > 1 {
		t.Fatalf("%d Redis commands for refused legacy handles after closing, want at most the one that found it closed", got)
	}
	if u, ok, err := gateway.Until(ctx); err != nil || !ok || !u.Equal(until) {
		t.Fatalf("Until = %v, %v, %v", u, ok, err)
	}

	// An operator closes the window of a fresh installation at once.
	m.FlushAll()
	fresh := newWindow()
	if err := client.Set(ctx, "fb:handles:legacy-until", "0", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if fresh.Accepts(ctx) {
		t.Fatal("SET ... 0 did not close the window")
	}

	// Redis down before the first read: accept (the store refuses anyway).
	m.Close()
	down := newWindow()
	if !down.Accepts(ctx) {
		t.Fatal("an unreadable window refused before it was ever read")
	}
	if _, _, err := down.Until(ctx); err == nil || errors.Is(err, redis.Nil) {
		t.Fatalf("Until with Redis down = %v, want the connection error", err)
	}
}
