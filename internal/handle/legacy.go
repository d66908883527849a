package handle

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// LegacyGrace is how long after the first replica started issuing keyed
// handles, beyond the longest session, legacy (CRC32) handles are still
// accepted: the time a rolling upgrade may take to replace every replica
// that issues legacy handles.
const LegacyGrace = time.Hour

// legacyRefresh is how often a replica whose window is still open asks
// Redis whether it has closed.
const legacyRefresh = 30 * time.Second

// LegacyWindow says whether legacy handles are still accepted. Its state is
// one Redis key, <prefix>:handles:legacy-until, holding a Unix time in
// milliseconds: the first credentials replica that issues keyed handles
// sets it (Close), and from then on every replica of both services refuses
// legacy handles once that time has passed, at the pre-check and without a
// store read. While the key is absent (every issuer still makes legacy
// handles) they are accepted.
//
// An operator who knows no legacy handle is alive (a new installation) may
// close the window at once: SET <prefix>:handles:legacy-until 0.
type LegacyWindow struct {
	client redis.UniversalClient
	key    string
	now    func() time.Time

	mu      sync.Mutex
	until   time.Time // valid when known
	known   bool      // the key was read and exists
	checked time.Time // last read of the key
}

// NewLegacyWindow returns the window kept under prefix's key.
func NewLegacyWindow(client redis.UniversalClient, prefix string) *LegacyWindow {
	return &LegacyWindow{client: client, key: prefix + ":handles:legacy-until", now: time.Now}
}

// Close records that legacy handles are accepted for at most after from
// now, unless an earlier replica recorded a time already (the first one
// wins: restarts do not reopen the window). It returns the time in force.
func (w *LegacyWindow) Close(ctx context.Context, after time.Duration) (time.Time, error) {
	until := w.now().Add(after)
	if err := w.client.SetNX(ctx, w.key, strconv.FormatInt(until.UnixMilli(), 10), 0).Err(); err != nil {
		return time.Time{}, err
	}
	return w.refresh(ctx)
}

// Until returns the time after which legacy handles are refused, and false
// while no keyed issuer has closed the window.
func (w *LegacyWindow) Until(ctx context.Context) (time.Time, bool, error) {
	if _, err := w.refresh(ctx); err != nil {
		return time.Time{}, false, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.until, w.known, nil
}

// Accepts reports whether a legacy handle may still be accepted. Redis is
// read at most every 30 s, and never again once the window has closed;
// when it cannot be read, the last answer stands (accept, before the first
// successful read: a store that cannot be read refuses every session
// anyway).
func (w *LegacyWindow) Accepts(ctx context.Context) bool {
	now := w.now()
	w.mu.Lock()
	closed := w.known && !now.Before(w.until)
	stale := now.Sub(w.checked) >= legacyRefresh
	w.mu.Unlock()
	if closed {
		return false
	}
	if stale {
		_, _ = w.refresh(ctx)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.known || now.Before(w.until)
}

func (w *LegacyWindow) refresh(ctx context.Context) (time.Time, error) {
	raw, err := w.client.Get(ctx, w.key).Result()
	now := w.now()
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case errors.Is(err, redis.Nil):
		w.known, w.checked = false, now
		return time.Time{}, nil
	case err != nil:
		return time.Time{}, err
	}
	ms, err := strconv.ParseInt(raw, 10, 64)
	if err != nil {
		// Unreadable: treat as closed, the safe side.
		ms = 0
	}
	w.until, w.known, w.checked = time.UnixMilli(ms), true, now
	return w.until, nil
}

// Verifier checks handles as both services must: a keyed handle by its MAC,
// a legacy one by its CRC32 and only while the window is open.
type Verifier struct {
	Keys *Keys
	// Legacy is the legacy window; nil refuses every legacy handle.
	Legacy *LegacyWindow
}

// Verify returns the checked handle, or ErrMalformed.
func (v Verifier) Verify(ctx context.Context, s string) (Checked, error) {
	c, err := v.Keys.Check(s)
	if err != nil {
		return Checked{}, err
	}
	if c.Legacy && (v.Legacy == nil || !v.Legacy.Accepts(ctx)) {
		return Checked{}, ErrMalformed
	}
	return c, nil
}
