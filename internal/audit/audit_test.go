package audit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var fullEvent = Event{
	Time:         time.Date(2026, 3, 1, 12, 0, 0, 500, time.FixedZone("CET", 3600)),
	Phase:        PhaseOutcome,
	RequestID:    "req-1",
	Principal:    "spiffe://example.org/ns/billing/sa/api",
	Via:          "uri-san",
	Peer:         "10.0.0.7:41234",
	Method:       "/fleetbroker.credentials.v1.SessionService/IssueSession",
	Provider:     "wialon",
	Target:       "core/search_items",
	Action:       "sessions.issue",
	TenantID:     "acme",
	CredentialID: "wialon-main",
	SessionID:    "s-123",
	Result:       ResultDenied,
	Code:         "PermissionDenied",
	Reason:       "SCOPE_NOT_GRANTED <raw> & more",
}

func decodeLine(t *testing.T, line []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("not a JSON line: %q: %v", line, err)
	}
	return m
}

func TestRecordFields(t *testing.T) {
	var buf bytes.Buffer
	if err := New(&buf).Record(context.Background(), fullEvent); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") {
		t.Fatalf("want exactly one line, got %q", out)
	}
	got := decodeLine(t, buf.Bytes())
	want := map[string]any{
		"time":          "2026-03-01T11:00:00.0000005Z", // UTC
		"phase":         "outcome",
		"request_id":    "req-1",
		"principal":     "spiffe://example.org/ns/billing/sa/api",
		"via":           "uri-san",
		"peer":          "10.0.0.7:41234",
		"provider":      "wialon",
		"target":        "core/search_items",
		"method":        "/fleetbroker.credentials.v1.SessionService/IssueSession",
		"action":        "sessions.issue",
		"tenant_id":     "acme",
		"credential_id": "wialon-main",
		"session_id":    "s-123",
		"result":        "denied",
		"code":          "PermissionDenied",
		"reason":        "SCOPE_NOT_GRANTED <raw> & more",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
	if strings.Contains(out, `\u003c`) {
		t.Errorf("HTML-escaped output: %s", out)
	}
}

func TestRecordOmitsEmptyFields(t *testing.T) {
	var buf bytes.Buffer
	before := time.Now()
	if err := New(&buf).Record(context.Background(), Event{Principal: "p", Result: ResultOK}); err != nil {
		t.Fatal(err)
	}
	got := decodeLine(t, buf.Bytes())
	if len(got) != 3 {
		t.Errorf("want time, principal and result only, got %v", got)
	}
	ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(got["time"]))
	if err != nil || ts.Before(before.Add(-time.Second)) || ts.After(time.Now()) {
		t.Errorf("a zero Time is not replaced by now: %v (%v)", got["time"], err)
	}
}

func TestNewlineInFieldStaysInLine(t *testing.T) {
	var buf bytes.Buffer
	if err := New(&buf).Record(context.Background(), Event{Reason: "line one\nline two"}); err != nil {
		t.Fatal(err)
	}
	if strings.Count(buf.String(), "\n") != 1 {
		t.Fatalf("a newline in a field split the line: %q", buf.String())
	}
	if got := decodeLine(t, buf.Bytes())["reason"]; got != "line one\nline two" {
		t.Errorf("reason = %q", got)
	}
}

func TestRecordRedactsHandlesAndJWTs(t *testing.T) {
	const handle = "fbs_4Zz1xY8wV7uT6sR5qP4oN3mL2kJ1iH0gF9eD8cB7aA6abc123"
	const jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
	var buf bytes.Buffer
	e := Event{SessionID: handle, Reason: "upstream said Bearer " + jwt + " is bad"}
	if err := New(&buf).Record(context.Background(), e); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if strings.Contains(out, "4Zz1xY8wV7uT6sR5") || strings.Contains(out, "eyJhbGciOiJIUzI1NiJ9") {
		t.Errorf("a handle or JWT reached the trail: %s", out)
	}
	got := decodeLine(t, buf.Bytes())
	if got["session_id"] != "[redacted]" || got["reason"] != "upstream said Bearer [redacted] is bad" {
		t.Errorf("unexpected redaction: %v", got)
	}
}

// redact skips the regexp for strings without the patterns' literals; it
// must agree with the pattern everywhere.
func TestRedactAgreesWithThePattern(t *testing.T) {
	for _, s := range []string{
		"", "ses_0123456789abcdef", "/fleetbroker.credentials.v1.SessionService/IssueSession", "spiffe://example.org/ns/a/sa/b",
		"fbs_", "fbs_short", "fbs_4Zz1xY8wV7uT6sR5qP4oN3mL2kJ1iH0gF9eD8cB7aA6abc123", "xfbs_4Zz1xY8wV7uT6sR5qP4oN3mL2kJ1iH0g!",
		"FBS_4Zz1xY8wV7uT6sR5qP4oN3mL2kJ1iH0gF9eD8cB7aA6abc123", "eyJ", "eyJhbGciOiJIUzI1NiJ9", "eyJa.b.", "a eyJa.b.c d",
		"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U and fbs_AAAAAAAAAAAAAAAAAAAAAAAA",
		"EYJhbGciOiJIUzI1NiJ9.eyJ.x",
	} {
		if got, want := redact(s), secretLike.ReplaceAllLiteralString(s, "[redacted]"); got != want {
			t.Errorf("redact(%q) = %q, want %q", s, got, want)
		}
	}
}

// slowWriter hands each Write on in small pieces, yielding in between, the
// way a pipe or socket may: unserialized Records would interleave there even
// where a regular file's O_APPEND writes would not.
type slowWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
}

func (w *slowWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.writes++
	w.mu.Unlock()
	for i := 0; i < len(p); i += 64 {
		w.mu.Lock()
		w.buf.Write(p[i:min(i+64, len(p))])
		w.mu.Unlock()
		runtime.Gosched()
	}
	return len(p), nil
}

func TestConcurrentRecordsDoNotInterleave(t *testing.T) {
	const n = 50
	long := strings.Repeat("x", 8<<10) // long lines make tearing likely
	recordAll := func(l *Logger) {
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				e := Event{RequestID: fmt.Sprintf("req-%d", i), Result: ResultOK, Reason: long}
				if err := l.Record(context.Background(), e); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	checkLines := func(name string, data []byte) {
		seen := map[string]bool{}
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			m := decodeLine(t, sc.Bytes())
			if m["reason"] != long {
				t.Errorf("%s: line %v has a damaged reason", name, m["request_id"])
			}
			seen[fmt.Sprint(m["request_id"])] = true
		}
		if len(seen) != n {
			t.Errorf("%s: want %d distinct lines, got %d", name, n, len(seen))
		}
	}

	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	recordAll(l)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	checkLines("file", data)

	var w slowWriter
	recordAll(New(&w))
	checkLines("writer", w.buf.Bytes())
	if w.writes != n {
		t.Errorf("%d events took %d Write calls; want one each", n, w.writes)
	}
}

// fakeFile is a file whose writes and syncs a test controls.
type fakeFile struct {
	mu        sync.Mutex
	data      []byte
	syncs     int
	truncates []int64
	// writeErr fails each Write after writing partial bytes of it;
	// syncErr fails each Sync.
	writeErr error
	partial  int
	syncErr  error
	// syncing, when set, receives once per Sync, which then waits for release.
	syncing chan struct{}
	release chan struct{}
}

func (f *fakeFile) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.writeErr != nil {
		n := min(f.partial, len(p))
		f.data = append(f.data, p[:n]...)
		return n, f.writeErr
	}
	f.data = append(f.data, p...)
	return len(p), nil
}

func (f *fakeFile) Sync() error {
	if f.syncing != nil {
		f.syncing <- struct{}{}
		<-f.release
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncs++
	return f.syncErr
}

func (f *fakeFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.truncates = append(f.truncates, size)
	f.data = f.data[:size]
	return nil
}

func (f *fakeFile) Close() error { return nil }

func (f *fakeFile) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return string(f.data)
}

// TestFailedBatchIsRefusedAndUndone: a write that fails part-way (a full
// disk) or a sync that fails fails Record, and the batch's bytes are cut
// off again, so the next record does not follow a torn line.
func TestFailedBatchIsRefusedAndUndone(t *testing.T) {
	for name, fail := range map[string]func(*fakeFile){
		"ENOSPC mid-write": func(f *fakeFile) { f.writeErr, f.partial = syscall.ENOSPC, 7 },
		"sync fails":       func(f *fakeFile) { f.syncErr = syscall.EIO },
	} {
		t.Run(name, func(t *testing.T) {
			f := &fakeFile{}
			l := start(&fileSink{f: f})
			defer l.Close()
			if err := l.Record(context.Background(), Event{RequestID: "before"}); err != nil {
				t.Fatal(err)
			}
			good := f.String()
			fail(f)
			err := l.Record(context.Background(), Event{RequestID: "lost"})
			if err == nil {
				t.Fatal("Record succeeded on a failing file")
			}
			if got := f.String(); got != good {
				t.Errorf("failed batch left %q behind", strings.TrimPrefix(got, good))
			}
			f.writeErr, f.syncErr = nil, nil
			if err := l.Record(context.Background(), Event{RequestID: "after"}); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(f.String()), "\n")
			if len(lines) != 2 || !strings.Contains(lines[0], `"before"`) || !strings.Contains(lines[1], `"after"`) {
				t.Errorf("file after recovery:\n%s", f.String())
			}
		})
	}
}

// lines counts the whole lines in f.
func (f *fakeFile) lines() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Count(f.data, []byte("\n"))
}

func (f *fakeFile) syncCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncs
}

// TestGroupCommit: Records that arrive while a sync runs are written at
// once, share the next sync, and each returns only after the sync that
// covers it.
func TestGroupCommit(t *testing.T) {
	f := &fakeFile{syncing: make(chan struct{}), release: make(chan struct{})}
	l := start(&fileSink{f: f})
	defer l.Close()
	first := make(chan error, 1)
	go func() { first <- l.Record(context.Background(), Event{RequestID: "first"}) }()
	<-f.syncing // the first line is being synced
	const n = 20
	done := make(chan error, n)
	for i := range n {
		go func() { done <- l.Record(context.Background(), Event{RequestID: fmt.Sprint("later-", i)}) }()
	}
	// Wait until all n lines are written behind the running sync.
	for f.lines() != n+1 {
		runtime.Gosched()
	}
	select {
	case err := <-done:
		t.Fatalf("a Record returned before its sync ran: %v", err)
	case err := <-first:
		t.Fatalf("the first Record returned before its sync ended: %v", err)
	default:
	}
	f.release <- struct{}{}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	<-f.syncing // the second sync: everything else
	select {
	case err := <-done:
		t.Fatalf("a Record returned before the sync covering it ended: %v", err)
	default:
	}
	f.release <- struct{}{}
	for range n {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if got := f.syncCount(); got != 2 {
		t.Errorf("%d Records took %d syncs, want 2", n+1, got)
	}
	if st := l.SyncStats(); st.Syncs != 2 || st.Lines != n+1 {
		t.Errorf("SyncStats = %+v, want 2 syncs of %d lines", st, n+1)
	}
}

// TestAppendDoesNotWaitForTheSync: an Append'ed line is in the file when
// Append returns, while the sync that makes it durable still runs; the
// next sync covers it, and a Record after it waits for that sync.
func TestAppendDoesNotWaitForTheSync(t *testing.T) {
	f := &fakeFile{syncing: make(chan struct{}), release: make(chan struct{})}
	l := start(&fileSink{f: f})
	defer l.Close()
	if err := l.Append(context.Background(), Event{RequestID: "outcome-1"}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(f.String(), `"outcome-1"`) {
		t.Fatalf("Append returned before writing its line: %q", f.String())
	}
	<-f.syncing // its sync runs, and Append did not wait for it
	if err := l.Append(context.Background(), Event{RequestID: "outcome-2"}); err != nil {
		t.Fatal(err)
	}
	recorded := make(chan error, 1)
	go func() { recorded <- l.Record(context.Background(), Event{RequestID: "intent-3"}) }()
	for f.lines() != 3 {
		runtime.Gosched()
	}
	f.release <- struct{}{} // the first sync ends
	<-f.syncing             // the second covers outcome-2 and intent-3
	select {
	case err := <-recorded:
		t.Fatalf("Record returned before the sync covering it: %v", err)
	default:
	}
	f.release <- struct{}{}
	if err := <-recorded; err != nil {
		t.Fatal(err)
	}
	if got := f.syncCount(); got != 2 {
		t.Errorf("syncs = %d, want 2", got)
	}
}

// TestCloseSyncsAppendedLines: Close returns only after the lines
// Append'ed before it are synced.
func TestCloseSyncsAppendedLines(t *testing.T) {
	f := &fakeFile{}
	l := start(&fileSink{f: f})
	for i := range 5 {
		if err := l.Append(context.Background(), Event{RequestID: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if f.syncCount() == 0 || f.lines() != 5 {
		t.Errorf("after Close: %d syncs, %d lines; want ≥ 1 sync of 5 lines", f.syncCount(), f.lines())
	}
	if err := l.Append(context.Background(), Event{}); err != ErrClosed {
		t.Errorf("Append after Close = %v, want ErrClosed", err)
	}
}

// TestFailedSyncCutsOffWhatItCovered: when a sync fails, the lines it was
// to cover and those written since are cut off (no unsynced line is left
// for later ones to follow), Records waiting for either fail, and lost
// Append'ed lines are logged.
func TestFailedSyncCutsOffWhatItCovered(t *testing.T) {
	f := &fakeFile{syncing: make(chan struct{}), release: make(chan struct{})}
	var logged bytes.Buffer
	l := start(&fileSink{f: f}, WithErrorLog(slog.New(slog.NewJSONHandler(&logged, nil))))
	defer l.Close()
	go func() { _ = l.Record(context.Background(), Event{RequestID: "kept"}) }()
	<-f.syncing
	f.release <- struct{}{}
	for f.syncCount() != 1 {
		runtime.Gosched()
	}
	good := f.String()

	f.mu.Lock()
	f.syncErr = syscall.EIO
	f.mu.Unlock()
	if err := l.Append(context.Background(), Event{RequestID: "outcome-lost"}); err != nil {
		t.Fatal(err)
	}
	<-f.syncing // the failing sync of outcome-lost
	later := make(chan error, 1)
	go func() { later <- l.Record(context.Background(), Event{RequestID: "intent-written-meanwhile"}) }()
	for f.lines() != 3 {
		runtime.Gosched()
	}
	f.release <- struct{}{}
	if err := <-later; err == nil {
		t.Fatal("a Record whose line the failed sync cut off succeeded")
	}
	if got := f.String(); got != good {
		t.Errorf("a failed sync left %q behind", strings.TrimPrefix(got, good))
	}
	if !strings.Contains(logged.String(), `"records":1`) {
		t.Errorf("the lost Append'ed line was not logged: %s", logged.String())
	}

	f.mu.Lock()
	f.syncErr = nil
	f.mu.Unlock()
	go func() {
		for range f.syncing {
			f.release <- struct{}{}
		}
	}()
	if err := l.Record(context.Background(), Event{RequestID: "after"}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(f.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"kept"`) || !strings.Contains(lines[1], `"after"`) {
		t.Errorf("file after recovery:\n%s", f.String())
	}
}

func TestOpenRefusesASecondWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second Open = %v, want refused", err)
	}
	l.Close()
	l2, err := Open(path)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	l2.Close()
	if !l2.Durable() || New(io.Discard).Durable() || Discard().Durable() {
		t.Error("only a file is durable")
	}
}

func TestOpenAppendsWithMode0600(t *testing.T) {
	dir := t.TempDir()
	fresh := filepath.Join(dir, "fresh.log")
	l, err := Open(fresh)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	fi, err := os.Stat(fresh)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("new audit file has mode %o, want 600", mode)
	}

	existing := filepath.Join(dir, "existing.log")
	const old = `{"time":"2026-01-01T00:00:00Z","result":"ok"}` + "\n"
	if err := os.WriteFile(existing, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 2 { // twice: reopening must append too
		l, err := Open(existing)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Record(context.Background(), Event{RequestID: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
		l.Close()
	}
	data, err := os.ReadFile(existing)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(data), "\n")
	if len(lines) != 4 || lines[0] != old || !strings.Contains(lines[1], `"request_id":"0"`) || !strings.Contains(lines[2], `"request_id":"1"`) {
		t.Errorf("pre-existing content not kept, or not appended:\n%s", data)
	}
}

// TestRecordIsReadableAtOnce reads the file through a separate descriptor
// right after Record returns: nothing may be left in a buffer.
func TestRecordIsReadableAtOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range 3 {
		if err := l.Record(context.Background(), Event{RequestID: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Count(string(data), "\n"); got != i+1 {
			t.Fatalf("after %d Records the file has %d lines", i+1, got)
		}
	}
}

func TestRecordAfterClose(t *testing.T) {
	l, err := Open(filepath.Join(t.TempDir(), "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Record(context.Background(), Event{}); err != ErrClosed {
		t.Errorf("Record after Close = %v, want ErrClosed", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestDiscard(t *testing.T) {
	if err := Discard().Record(context.Background(), fullEvent); err != nil {
		t.Error(err)
	}
}
