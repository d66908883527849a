package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/handle"
)

// minWatchInterval is the shortest poll interval a watcher may ask for (the
// contract refuses less); it keeps one account's polling within FleetUp's
// one-request-per-second guidance.
const minWatchInterval = time.Second

// hubs runs one upstream poll per credential generation, shared by every
// watcher of that credential in this replica.
type hubs struct {
	s     *Service
	mu    sync.Mutex
	byKey map[string]*hub
}

// hub polls one credential for its watchers and fans each result out.
//
// It also works out, once for all its watchers, what changed: every poll's
// positions carry the hub's change number at which each last moved or got
// a newer fix, so a watcher only remembers the change number it last sent
// up to, not every position it sent (what kept each open stream's memory
// in proportion to its units).
type hub struct {
	key      string
	stop     context.CancelFunc
	mu       sync.Mutex
	watchers map[*watcher]struct{}
	// last is the newest successful poll, handed to a watcher that joins
	// between polls so its first message does not wait a whole interval.
	last *pollResult
	// seq counts changes; marks is each unit's last position and the seq
	// at which it changed, as of the last successful poll.
	seq   uint64
	marks map[string]mark
}

// mark is a unit's last position and when (in the hub's changes) it
// changed.
type mark struct {
	pos *telematicsv1.Position
	seq uint64
}

// watcher is one WatchPositions stream.
type watcher struct {
	sess     *session
	interval time.Duration
	// units are the unit ids the stream asked for (nil: all).
	units map[string]bool
	// sentSeq is the hub's change number up to which the stream has sent
	// every change; sentAny whether it sent its first message.
	sentSeq uint64
	sentAny bool
	// updates holds the newest poll result; an older one not yet taken is
	// replaced, so a slow stream never holds up the poll or the others.
	updates chan pollResult
	// values are the stream's context values without its cancellation: a
	// poll this watcher starts runs (and logs in upstream) on its behalf,
	// so its audit records name this call's session.
	values context.Context
}

// pollResult is one poll's answer as its watchers take it: every position,
// the hub's change number at which each last changed (changed[i] for
// positions[i]), and the hub's change number after the poll. It is shared
// by every watcher and never modified.
type pollResult struct {
	positions []*telematicsv1.Position
	changed   []uint64
	seq       uint64
	err       error
}

func newHubs(s *Service) *hubs { return &hubs{s: s, byKey: map[string]*hub{}} }

// join adds w to the hub of its credential, starting the poll if needed.
func (hs *hubs) join(w *watcher) *hub {
	key := w.sess.target().SessionKey()
	hs.mu.Lock()
	defer hs.mu.Unlock()
	h, ok := hs.byKey[key]
	var pollCtx context.Context
	if !ok {
		var cancel context.CancelFunc
		parent := w.values
		if parent == nil {
			parent = context.Background()
		}
		pollCtx, cancel = context.WithCancel(parent)
		h = &hub{key: key, stop: cancel, watchers: map[*watcher]struct{}{}}
		hs.byKey[key] = h
	}
	h.mu.Lock()
	h.watchers[w] = struct{}{}
	if h.last != nil {
		w.updates <- *h.last
	}
	h.mu.Unlock()
	if pollCtx != nil {
		// Only now that w is registered: a poll that started first could
		// find no watcher, end, and leave w waiting forever.
		go hs.poll(pollCtx, h)
	}
	return h
}

// leave removes w; the last watcher to leave stops the poll.
func (hs *hubs) leave(h *hub, w *watcher) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	h.mu.Lock()
	delete(h.watchers, w)
	empty := len(h.watchers) == 0
	h.mu.Unlock()
	if empty {
		h.stop()
		delete(hs.byKey, h.key)
	}
}

// snapshot returns a watcher's session to poll with and the shortest
// interval any watcher asked for.
func (h *hub) snapshot() (*session, time.Duration, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var sess *session
	interval := time.Duration(0)
	for w := range h.watchers {
		if sess == nil || w.sess.expireTime.After(sess.expireTime) {
			sess = w.sess
		}
		if interval == 0 || w.interval < interval {
			interval = w.interval
		}
	}
	return sess, interval, sess != nil
}

func (h *hub) broadcast(r pollResult) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.err == nil {
		h.markChanges(&r)
		h.last = &r
	}
	for w := range h.watchers {
		select {
		case <-w.updates: // drop the stale result nobody took yet
		default:
		}
		w.updates <- r
	}
}

// markChanges numbers the positions of r that moved or have a newer fix
// since the last successful poll, and fills in r's change numbers.
func (h *hub) markChanges(r *pollResult) {
	marks := make(map[string]mark, len(r.positions))
	r.changed = make([]uint64, len(r.positions))
	for i, p := range r.positions {
		m, ok := h.marks[p.GetUnitId()]
		if !ok || !samePosition(m.pos, p) {
			h.seq++
			m.seq = h.seq
		}
		m.pos = p
		marks[p.GetUnitId()] = m
		r.changed[i] = m.seq
	}
	h.marks = marks
	r.seq = h.seq
}

// samePosition reports whether b has neither moved nor got a newer fix
// than a.
func samePosition(a, b *telematicsv1.Position) bool {
	return a.GetTime().AsTime().Equal(b.GetTime().AsTime()) && a.GetLatitude() == b.GetLatitude() && a.GetLongitude() == b.GetLongitude()
}

// poll fetches the credential's latest positions every interval until the
// last watcher leaves. It polls with the longest-lived watcher's session;
// each watcher re-checks its own session (see WatchPositions).
func (hs *hubs) poll(ctx context.Context, h *hub) {
	for {
		sess, interval, ok := h.snapshot()
		if !ok {
			return
		}
		positions, err := hs.s.latestPositions(ctx, sess)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			hs.s.logCause(ctx, slog.LevelWarn, "watch poll", err)
		}
		h.broadcast(pollResult{positions: positions, err: err})
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// WatchPositions streams position changes of the named units (all if none).
// The first message holds every position; later ones only those that moved
// or have a newer fix. Many watchers of one credential share one poll.
func (s *Service) WatchPositions(req *telematicsv1.WatchPositionsRequest, stream telematicsv1.TelematicsService_WatchPositionsServer) error {
	ctx := stream.Context()
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_READ)
	if err != nil {
		return err
	}
	release, err := s.streams.acquire(sess)
	if err != nil {
		return err
	}
	defer release()
	w := &watcher{sess: sess, interval: DefaultWatchInterval, updates: make(chan pollResult, 1), values: context.WithoutCancel(ctx)}
	if req.GetMinInterval() != nil {
		w.interval = max(req.GetMinInterval().AsDuration(), minWatchInterval)
	}
	if ids := req.GetUnitIds(); len(ids) > 0 {
		w.units = make(map[string]bool, len(ids))
		for _, id := range ids {
			w.units[id] = true
		}
	}
	h := s.hubs.join(w)
	defer s.hubs.leave(h, w)

	// Re-resolve the handle as often as the resolution cache expires, so a
	// revoked or expired handle ends its streams within the same bound as
	// its unary calls.
	recheck := time.NewTicker(max(s.cfg.HandleCacheTTL, 500*time.Millisecond))
	defer recheck.Stop()
	for {
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-recheck.C:
			if _, err := s.resolver.revalidate(ctx, sess.handle); err != nil {
				return s.toStatus(ctx, "watch positions", err)
			}
		case r := <-w.updates:
			if r.err != nil {
				// Logged once by the poll, not once per watcher.
				if st := s.mapStatus(ctx, "watch positions", r.err); endsWatch(st) {
					return st
				}
				continue // transient: the next poll may succeed
			}
			changed := w.changes(r)
			if len(changed) == 0 && w.sentAny {
				continue
			}
			w.sentAny = true
			if err := stream.Send(&telematicsv1.WatchPositionsResponse{Positions: changed}); err != nil {
				return err
			}
		}
	}
}

// endsWatch says whether a poll error ends the stream: only errors that the
// next poll cannot fix.
func endsWatch(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded, codes.Internal:
		return false
	}
	return true
}

// changes returns the positions of r the stream asked for that changed
// since it last sent (all of them for its first message), and records r as
// sent.
func (w *watcher) changes(r pollResult) []*telematicsv1.Position {
	var out []*telematicsv1.Position
	for i, p := range r.positions {
		if (w.sentAny && r.changed[i] <= w.sentSeq) || (w.units != nil && !w.units[p.GetUnitId()]) {
			continue
		}
		out = append(out, p)
	}
	w.sentSeq = r.seq
	return out
}

// streamLimits counts this replica's open WatchPositions streams per
// session handle and per tenant, and refuses a stream past either limit.
// The counts live in the replica's memory, like the streams themselves: a
// limit bounds what one replica holds (the memory a stream costs is spent
// where it is open), and needs no cross-replica state that a crashed
// replica would leave behind. Across n replicas a handle may hold n times
// its limit.
type streamLimits struct {
	perHandle, perTenant int // ≤ 0: no limit
	mu                   sync.Mutex
	byHandle             map[handle.Hash]int
	byTenant             map[string]int
}

func newStreamLimits(perHandle, perTenant int) *streamLimits {
	return &streamLimits{perHandle: perHandle, perTenant: perTenant, byHandle: map[handle.Hash]int{}, byTenant: map[string]int{}}
}

// acquire counts one more stream of sess, or refuses it with
// RESOURCE_EXHAUSTED TOO_MANY_STREAMS. release uncounts it.
func (l *streamLimits) acquire(sess *session) (release func(), err error) {
	h := handle.HashOf(sess.handle)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.perHandle > 0 && l.byHandle[h] >= l.perHandle {
		return nil, tooManyStreams("this session handle", "handle", l.perHandle)
	}
	if l.perTenant > 0 && l.byTenant[sess.tenantID] >= l.perTenant {
		return nil, tooManyStreams("this tenant", "tenant", l.perTenant)
	}
	l.byHandle[h]++
	l.byTenant[sess.tenantID]++
	tenant := sess.tenantID
	return func() { l.release(h, tenant) }, nil
}

func (l *streamLimits) release(h handle.Hash, tenant string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byHandle[h]--; l.byHandle[h] <= 0 {
		delete(l.byHandle, h)
	}
	if l.byTenant[tenant]--; l.byTenant[tenant] <= 0 {
		delete(l.byTenant, tenant)
	}
}

func tooManyStreams(who, scope string, limit int) error {
	return apierr.New(codes.ResourceExhausted, apierr.ReasonTooManyStreams,
		fmt.Sprintf("%s already holds %d open WatchPositions streams on this gateway, its limit; close one first (one stream can watch many units)", who, limit),
		map[string]string{"limit_scope": scope, "limit": strconv.Itoa(limit)})
}
