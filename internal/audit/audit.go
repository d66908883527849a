// Package audit writes the audit trail: one JSON object per line for every
// decision the services make about a call, with who asked, how they proved
// it, what for, and the outcome.
//
// A call the services run is recorded twice, linked by its request id: an
// intent record (PhaseIntent) before the handler touches Redis, Vault or a
// provider, and an outcome record (PhaseOutcome) after. A call refused
// before it runs (unauthenticated, denied, rate limited) has only an
// outcome record. Callers make the intent durable first (Record) and
// refuse the call when that fails: the trail fails closed. The outcome is
// written before the reply but not waited for (Append): the next group
// commit makes it durable.
//
// The trail is append-only: a file is opened with O_APPEND and never
// rewritten; the only truncation undoes records whose write or sync failed,
// so a torn line never precedes later records. Every line is written to
// the file (one write, whole lines, never interleaved) before Record or
// Append returns, so a crash of the process loses nothing written; what
// the sync adds is surviving a crash of the machine. Record also waits
// until a sync covers its line. Syncs are shared (group commit): one runs
// at a time, and each covers every line written before it started, so a
// Record waits for at most the sync already running plus its own, whatever
// the load. An Append'ed line is durable once the sync after it ends: the
// one already running plus the next. One process writes a file: Open takes
// an exclusive lock on it.
//
// An event carries identifiers and outcomes only: never a secret, a session
// handle, an upstream token or a JWT. Callers pass session ids (safe to
// log), not handles; as a last line of defence, anything that looks like a
// handle or a JWT is replaced with "[redacted]" before it is written.
package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Phases of a record.
const (
	PhaseIntent  = "intent"  // the call is about to run
	PhaseOutcome = "outcome" // how it ended (or why it was refused)
)

// Results of a call.
const (
	ResultOK     = "ok"
	ResultDenied = "denied"
	ResultError  = "error"
)

// Event is one audit record. Empty fields are left out of the line.
type Event struct {
	// Time is when the decision was made; zero means when Record is called.
	Time      time.Time `json:"time"`
	Phase     string    `json:"phase,omitempty"` // PhaseIntent or PhaseOutcome
	RequestID string    `json:"request_id,omitempty"`
	// Principal is the caller with its source prefix (package authn), Via
	// how it was established, Peer its network address.
	Principal string `json:"principal,omitempty"`
	Via       string `json:"via,omitempty"`
	Peer      string `json:"peer,omitempty"`
	Method    string `json:"method,omitempty"` // the full gRPC method
	// Action is the policy action checked, "session" for a call authorized
	// by its session handle, or "upstream.login" for a login or token mint
	// on behalf of a session.
	Action       string `json:"action,omitempty"`
	TenantID     string `json:"tenant_id,omitempty"`
	CredentialID string `json:"credential_id,omitempty"`
	SessionID    string `json:"session_id,omitempty"`
	// Provider is the upstream ("wialon", "fleetup") of a login or a raw
	// call; Target what a raw call asked for (a Wialon svc, a FleetUp method
	// and path).
	Provider string `json:"provider,omitempty"`
	Target   string `json:"target,omitempty"`
	// Items is how many items a batch call (BatchPutCredentials) carries
	// and CredentialIDs which, comma-separated in request order (ids never
	// contain a comma); in its outcome, ItemsFailed is how many failed.
	// Each item's own outcome is a record of its own, with its
	// CredentialID and the call's RequestID.
	Items         int    `json:"items,omitempty"`
	CredentialIDs string `json:"credential_ids,omitempty"`
	ItemsFailed   int    `json:"items_failed,omitempty"`
	Result        string `json:"result,omitempty"` // ResultOK, ResultDenied or ResultError
	Code          string `json:"code,omitempty"`   // the gRPC code name, e.g. "PermissionDenied"
	Reason        string `json:"reason,omitempty"` // an ErrorInfo reason or a short text
}

// ErrClosed is returned by Record after Close.
var ErrClosed = errors.New("audit: log closed")

// Logger writes events. It is safe for concurrent use.
type Logger struct {
	sink    sink
	discard bool
	errLog  *slog.Logger // told about Append'ed records a failed sync lost

	syncs    atomic.Int64 // syncs run
	synced   atomic.Int64 // lines they covered
	syncTime atomic.Int64 // nanoseconds spent in them

	mu     sync.Mutex // serializes writes; guards what follows
	next   *group     // lines written since the running sync began; nil when none
	closed bool
	wake   chan struct{} // one token: next has lines
	stop   chan struct{}
	done   chan struct{}
}

// group is the lines one sync covers: written while the sync before it
// ran (or nothing ran).
type group struct {
	done chan struct{}
	err  error // set before done is closed
	// lines counts its lines; appended those whose writers did not wait
	// (Append).
	lines, appended int
}

// sink is where lines go: a file we opened (synced, failures undone), or
// any writer.
type sink interface {
	// write writes one line whole, or fails and leaves no part of it
	// behind where it can. It is called under Logger.mu.
	write(line []byte) error
	// written is the length written so far (under Logger.mu).
	written() int64
	// sync makes everything written durable; it runs outside Logger.mu,
	// while later lines are written.
	sync() error
	// synced records that a sync covered everything up to n; undo cuts
	// off everything written after the last synced length (both under
	// Logger.mu).
	synced(n int64)
	undo()
	close() error
	// durable reports whether sync reaches stable storage.
	durable() bool
}

// Option configures Open.
type Option func(*Logger)

// WithErrorLog makes the Logger report records it lost after Append
// returned (a sync that failed cut them off again) on logger.
func WithErrorLog(logger *slog.Logger) Option {
	return func(l *Logger) { l.errLog = logger }
}

// Open appends to the audit file at path, creating it with mode 0600 if it
// does not exist. An existing file keeps its content and its mode. It fails
// if another process has the file open through Open.
func Open(path string, opts ...Option) (*Logger, error) {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("audit file %s is in use by another process (one writer per file): %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return start(&fileSink{f: f, size: fi.Size(), durableSize: fi.Size()}, opts...), nil
}

// New writes events to w, one Write call per line, without syncing: for
// stderr, a pipe, or tests. A Write error still fails Record, but nothing
// here can say whether the reader kept the line.
func New(w io.Writer) *Logger {
	return start(&writerSink{w: w})
}

// Discard returns a Logger that drops every event.
func Discard() *Logger {
	return &Logger{discard: true}
}

func start(s sink, opts ...Option) *Logger {
	l := &Logger{sink: s, errLog: slog.Default(), wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	for _, o := range opts {
		o(l)
	}
	go l.run()
	return l
}

// Durable reports whether a successful Record means the line is on stable
// storage (a file we sync), rather than handed to a writer.
func (l *Logger) Durable() bool { return !l.discard && l.sink.durable() }

// SyncStats are what a Logger's syncs did so far.
type SyncStats struct {
	Syncs int64         // syncs run
	Lines int64         // lines they covered (group commit: Lines/Syncs per sync)
	Time  time.Duration // time spent syncing
}

// SyncStats reports the Logger's syncs so far (none for a writer or
// Discard), for metrics and the benchmark.
func (l *Logger) SyncStats() SyncStats {
	return SyncStats{Syncs: l.syncs.Load(), Lines: l.synced.Load(), Time: time.Duration(l.syncTime.Load())}
}

// Record writes e as one JSON line and returns once it is written and, for
// a file opened by Open, synced. An error means the event is not on record;
// callers refuse the call rather than run it (or reply) without a record.
//
// ctx is not consulted: a call whose context is already cancelled (a caller
// that gave up, a denied call) must still be recorded.
func (l *Logger) Record(_ context.Context, e Event) error {
	g, err := l.write(e, false)
	if err != nil || g == nil {
		return err
	}
	<-g.done
	return g.err
}

// Append writes e as one JSON line and returns once it is written, without
// waiting for the sync: the group commit under way when it returns, or the
// next one, makes it durable. A crash of the process after Append loses
// nothing; a crash of the machine before that sync ends can lose the line.
// If that sync fails the line is cut off again and the loss is logged (see
// WithErrorLog). An error means the line was not written.
//
// It is for records whose loss cannot be prevented by refusing anything:
// a call's outcome, written after the call ran and whose intent is durable.
func (l *Logger) Append(_ context.Context, e Event) error {
	_, err := l.write(e, true)
	return err
}

// write writes e's line and returns the group whose sync covers it (nil
// when the sink does not sync, or nothing was written).
func (l *Logger) write(e Event, appended bool) (*group, error) {
	if l.discard {
		return nil, nil
	}
	line, err := encode(e)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, ErrClosed
	}
	if err := l.sink.write(line); err != nil {
		l.mu.Unlock()
		return nil, err
	}
	if !l.sink.durable() {
		l.mu.Unlock()
		return nil, nil
	}
	g := l.next
	if g == nil {
		g = &group{done: make(chan struct{})}
		l.next = g
	}
	g.lines++
	if appended {
		g.appended++
	}
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default: // the syncer is already told
	}
	return g, nil
}

// run is the syncer: it syncs every line written while the previous sync
// ran, together.
func (l *Logger) run() {
	defer close(l.done)
	for {
		select {
		case <-l.wake:
		case <-l.stop:
			l.syncNext() // lines written before Close
			return
		}
		l.syncNext()
	}
}

// syncNext syncs the lines written so far. Lines written while it syncs
// wait for the next one.
func (l *Logger) syncNext() {
	l.mu.Lock()
	g := l.next
	l.next = nil
	upTo := l.sink.written()
	l.mu.Unlock()
	if g == nil {
		return
	}
	began := time.Now()
	err := l.sink.sync()
	l.syncTime.Add(int64(time.Since(began)))
	l.syncs.Add(1)
	l.synced.Add(int64(g.lines))
	failed := []*group{g}
	l.mu.Lock()
	if err == nil {
		l.sink.synced(upTo)
	} else {
		// What the failed sync was to cover may be gone: cut the file
		// back to its last synced length, so no torn or unsynced line is
		// left for later ones to follow. That also cuts off lines written
		// since this sync began: their group fails too.
		err = fmt.Errorf("audit: sync: %w", err)
		l.sink.undo()
		if l.next != nil {
			failed = append(failed, l.next)
			l.next = nil
		}
	}
	l.mu.Unlock()
	if err != nil {
		lost := 0
		for _, f := range failed {
			lost += f.appended
		}
		if lost > 0 {
			l.errLog.Error("audit records lost: the sync that was to make them durable failed, and they were cut off the file (outcome records of calls whose intent is on record)",
				"records", lost, "error", err)
		}
	}
	for _, f := range failed { // more than g only if the sync failed
		f.err = err
		close(f.done)
	}
}

// encode renders e as a JSON line, redacting what must never be on record.
func encode(e Event) ([]byte, error) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	for _, s := range []*string{&e.Phase, &e.RequestID, &e.Principal, &e.Via, &e.Peer, &e.Method, &e.Action, &e.TenantID,
		&e.CredentialID, &e.CredentialIDs, &e.SessionID, &e.Provider, &e.Target, &e.Result, &e.Code, &e.Reason} {
		*s = redact(*s)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // keep "<" and "&" in reasons readable
	if err := enc.Encode(e); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil // Encode ends the line; JSON strings escape their own newlines
}

// secretLike matches session handles (fbs_ + base62) and JWTs (three
// base64url parts, the first of which always starts with "eyJ", i.e. `{"`).
var secretLike = regexp.MustCompile(`fbs_[0-9A-Za-z]{20,}|eyJ[0-9A-Za-z_-]+\.[0-9A-Za-z_-]+\.[0-9A-Za-z_-]*`)

func redact(s string) string {
	// Both patterns start with a literal; most fields (ids, method names,
	// codes) hold neither and skip the regexp, which profiling showed as
	// most of the cost of a record.
	if !strings.Contains(s, "fbs_") && !strings.Contains(s, "eyJ") {
		return s
	}
	return secretLike.ReplaceAllLiteralString(s, "[redacted]")
}

// Close makes what was written before it durable, closes the file opened
// by Open, and makes later Records and Appends fail with ErrClosed.
func (l *Logger) Close() error {
	if l.discard {
		return nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	return l.sink.close()
}

// file is what fileSink needs of an *os.File; tests substitute failures.
type file interface {
	Write([]byte) (int, error)
	Sync() error
	Truncate(size int64) error
	Close() error
}

// fileSink appends to a file and syncs it. size is the length of the file
// up to the last whole line written; durableSize up to the last sync.
type fileSink struct {
	f           file
	size        int64
	durableSize int64
}

func (s *fileSink) write(line []byte) error {
	n, err := s.f.Write(line)
	if err != nil {
		// Cut the torn line off, so the next one does not follow it.
		if n > 0 {
			_ = s.f.Truncate(s.size)
		}
		return fmt.Errorf("audit: write: %w", err)
	}
	s.size += int64(n)
	return nil
}

func (s *fileSink) written() int64 { return s.size }
func (s *fileSink) sync() error    { return s.f.Sync() }
func (s *fileSink) synced(n int64) { s.durableSize = max(s.durableSize, n) }

func (s *fileSink) undo() {
	if s.size > s.durableSize {
		_ = s.f.Truncate(s.durableSize)
		s.size = s.durableSize
	}
}

func (s *fileSink) close() error  { return s.f.Close() }
func (s *fileSink) durable() bool { return true }

type writerSink struct{ w io.Writer }

func (s *writerSink) write(line []byte) error {
	if _, err := s.w.Write(line); err != nil {
		return fmt.Errorf("audit: write: %w", err)
	}
	return nil
}

func (*writerSink) written() int64 { return 0 }
func (*writerSink) sync() error    { return nil }
func (*writerSink) synced(int64)   {}
func (*writerSink) undo()          {}
func (*writerSink) close() error   { return nil }
func (*writerSink) durable() bool  { return false }
