// Package audit writes the audit trail: one JSON object per line for every
// decision the services make about a call, with who asked, how they proved
// it, what for, and the outcome.
//
// A call the services run is recorded twice, linked by its request id: an
// intent record (PhaseIntent) before the handler touches Redis, Vault or a
// provider, and an outcome record (PhaseOutcome) after. A call refused
// before it runs (unauthenticated, denied, rate limited) has only an
// outcome record. Callers make the intent durable first and refuse the call
// when Record fails: the trail fails closed.
//
// The trail is append-only: a file is opened with O_APPEND and never
// rewritten; the only truncation undoes a batch whose write or sync failed,
// so a torn line never precedes later records. Record returns only once its
// line is written and, for a file, synced to disk. Concurrent Records share
// one write and one fsync (group commit): a call waits for at most the one
// sync already running plus its own, whatever the load. Lines are written
// whole and never interleave. One process writes a file: Open takes an
// exclusive lock on it.
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
	"os"
	"regexp"
	"strings"
	"sync"
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
	Result   string `json:"result,omitempty"` // ResultOK, ResultDenied or ResultError
	Code     string `json:"code,omitempty"`   // the gRPC code name, e.g. "PermissionDenied"
	Reason   string `json:"reason,omitempty"` // an ErrorInfo reason or a short text
}

// ErrClosed is returned by Record after Close.
var ErrClosed = errors.New("audit: log closed")

// Logger writes events. It is safe for concurrent use.
type Logger struct {
	sink    sink
	discard bool

	mu     sync.Mutex
	cur    *batch // lines waiting for the writer; nil when none
	closed bool
	wake   chan struct{} // one token: cur has lines
	stop   chan struct{}
	done   chan struct{}
}

// batch is the lines of the Records that share one write and one sync.
type batch struct {
	buf  []byte
	done chan struct{}
	err  error // set before done is closed
}

// sink is where lines go: a file we opened (synced, torn batches undone), or
// any writer.
type sink interface {
	// commit writes buf whole and makes it durable, or fails and leaves
	// no part of it behind where it can.
	commit(buf []byte) error
	close() error
	// Durable reports whether commit syncs to stable storage.
	durable() bool
}

// Open appends to the audit file at path, creating it with mode 0600 if it
// does not exist. An existing file keeps its content and its mode. It fails
// if another process has the file open through Open.
func Open(path string) (*Logger, error) {
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
	return start(&fileSink{f: f, size: fi.Size()}), nil
}

// New writes events to w, one Write call per batch, without syncing: for
// stderr, a pipe, or tests. A Write error still fails Record, but nothing
// here can say whether the reader kept the line.
func New(w io.Writer) *Logger {
	return start(writerSink{w: w})
}

// Discard returns a Logger that drops every event.
func Discard() *Logger {
	return &Logger{discard: true}
}

func start(s sink) *Logger {
	l := &Logger{sink: s, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go l.run()
	return l
}

// Durable reports whether a successful Record means the line is on stable
// storage (a file we sync), rather than handed to a writer.
func (l *Logger) Durable() bool { return !l.discard && l.sink.durable() }

// Record writes e as one JSON line and returns once it is written and, for
// a file opened by Open, synced. An error means the event is not on record;
// callers refuse the call rather than run it (or reply) without a record.
//
// ctx is not consulted: a call whose context is already cancelled (a caller
// that gave up, a denied call) must still be recorded.
func (l *Logger) Record(_ context.Context, e Event) error {
	if l.discard {
		return nil
	}
	line, err := encode(e)
	if err != nil {
		return err
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	b := l.cur
	if b == nil {
		b = &batch{done: make(chan struct{})}
		l.cur = b
	}
	b.buf = append(b.buf, line...)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default: // the writer is already told
	}
	<-b.done
	return b.err
}

// run is the writer: it takes every line gathered while the previous batch
// was being synced, and commits them together.
func (l *Logger) run() {
	defer close(l.done)
	for {
		select {
		case <-l.wake:
		case <-l.stop:
			l.flush() // Records that got in before Close
			return
		}
		l.flush()
	}
}

func (l *Logger) flush() {
	l.mu.Lock()
	b := l.cur
	l.cur = nil
	l.mu.Unlock()
	if b == nil {
		return
	}
	b.err = l.sink.commit(b.buf)
	close(b.done)
}

// encode renders e as a JSON line, redacting what must never be on record.
func encode(e Event) ([]byte, error) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	for _, s := range []*string{&e.Phase, &e.RequestID, &e.Principal, &e.Via, &e.Peer, &e.Method, &e.Action, &e.TenantID,
		&e.CredentialID, &e.SessionID, &e.Provider, &e.Target, &e.Result, &e.Code, &e.Reason} {
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

// Close writes what was recorded before it, closes the file opened by Open,
// and makes later Records fail with ErrClosed.
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

// fileSink appends to a file and syncs each batch. size is the length of
// the file up to the last committed batch.
type fileSink struct {
	f    file
	size int64
}

func (s *fileSink) commit(buf []byte) error {
	n, err := s.f.Write(buf)
	if err == nil {
		err = s.f.Sync()
	}
	if err != nil {
		// Undo the batch, so no torn line is left for the next one to
		// follow: its calls are refused, and its lines must not claim them.
		if n > 0 {
			_ = s.f.Truncate(s.size)
		}
		return fmt.Errorf("audit: write: %w", err)
	}
	s.size += int64(n)
	return nil
}

func (s *fileSink) close() error  { return s.f.Close() }
func (s *fileSink) durable() bool { return true }

type writerSink struct{ w io.Writer }

func (s writerSink) commit(buf []byte) error {
	if _, err := s.w.Write(buf); err != nil {
		return fmt.Errorf("audit: write: %w", err)
	}
	return nil
}

func (writerSink) close() error  { return nil }
func (writerSink) durable() bool { return false }
