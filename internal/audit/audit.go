// Package audit writes the audit trail: one JSON object per line for every
// decision the services make about a call (allowed, denied or failed), with
// who asked, what for, and the outcome.
//
// The trail is append-only: a file is opened with O_APPEND and never
// truncated or rewritten. Record returns only once its line is written, and,
// for a file, synced to disk, so a call is on record before its reply leaves.
// Lines are written whole, one Write each, and never interleave.
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
	"io"
	"os"
	"regexp"
	"sync"
	"time"
)

// Results of a call.
const (
	ResultOK     = "ok"
	ResultDenied = "denied"
	ResultError  = "error"
)

// Event is one audited call. Empty fields are left out of the line.
type Event struct {
	// Time is when the decision was made; zero means when Record is called.
	Time         time.Time `json:"time"`
	RequestID    string    `json:"request_id,omitempty"`
	Principal    string    `json:"principal,omitempty"`
	Method       string    `json:"method,omitempty"` // the full gRPC method
	Action       string    `json:"action,omitempty"` // the policy action checked
	TenantID     string    `json:"tenant_id,omitempty"`
	CredentialID string    `json:"credential_id,omitempty"`
	SessionID    string    `json:"session_id,omitempty"`
	Result       string    `json:"result,omitempty"` // ResultOK, ResultDenied or ResultError
	Code         string    `json:"code,omitempty"`   // the gRPC code name, e.g. "PermissionDenied"
	Reason       string    `json:"reason,omitempty"` // an ErrorInfo reason or a short text
}

// ErrClosed is returned by Record after Close.
var ErrClosed = errors.New("audit: log closed")

// Logger writes events. It is safe for concurrent use.
type Logger struct {
	mu     sync.Mutex
	w      io.Writer
	sync   func() error // flushes w to stable storage; nil when w is not a file we opened
	close  func() error
	closed bool
}

// Open appends to the audit file at path, creating it with mode 0600 if it
// does not exist. An existing file keeps its content and its mode.
func Open(path string) (*Logger, error) {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	return &Logger{w: f, sync: f.Sync, close: f.Close}, nil
}

// New writes events to w, one Write call per event, without syncing: for
// stdout, a pipe, or tests.
func New(w io.Writer) *Logger {
	return &Logger{w: w}
}

// Discard returns a Logger that drops every event.
func Discard() *Logger {
	return New(io.Discard)
}

// Record writes e as one JSON line, and for a file opened by Open, syncs it
// before returning. An error means the event may not be on record; callers
// should fail the call rather than reply without a record.
//
// ctx is not consulted: a call whose context is already cancelled (a caller
// that gave up, a denied call) must still be recorded.
func (l *Logger) Record(_ context.Context, e Event) error {
	line, err := encode(e)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if _, err := l.w.Write(line); err != nil {
		return err
	}
	if l.sync != nil {
		return l.sync()
	}
	return nil
}

// encode renders e as a JSON line, redacting what must never be on record.
func encode(e Event) ([]byte, error) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	for _, s := range []*string{&e.RequestID, &e.Principal, &e.Method, &e.Action, &e.TenantID,
		&e.CredentialID, &e.SessionID, &e.Result, &e.Code, &e.Reason} {
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
	if s == "" {
		return s
	}
	return secretLike.ReplaceAllLiteralString(s, "[redacted]")
}

// Close closes the file opened by Open; later Records fail with ErrClosed.
func (l *Logger) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	if l.close != nil {
		return l.close()
	}
	return nil
}
