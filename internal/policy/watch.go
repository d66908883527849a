package policy

import (
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/fleetbroker/fleetbroker/internal/filewatch"
)

// Source gives the policy in force now. Handlers call Current on every
// request rather than keeping the result, so a reload applies at once.
type Source interface {
	Current() *Policy
}

// Watcher keeps the policy of a file current: it reloads the file when it
// changes and keeps the last good policy when a new version is invalid.
type Watcher struct {
	current atomic.Pointer[Policy]

	// Set only by Watch; a Static watcher has none of them.
	path   string
	format string
	logger *slog.Logger
	files  *filewatch.Watcher

	// Owned by the watch's goroutine once it runs.
	seen    [sha256.Size]byte // digest of the last content looked at, valid or not
	stamp   os.FileInfo       // the file's stat at that time; nil if it failed
	readErr string            // the last read error reported, to report it once
}

var _ Source = (*Watcher)(nil)

// Static returns a Watcher that always serves p and never reloads, for tests
// and `fleetbroker dev`. Close does nothing.
func Static(p *Policy) *Watcher {
	w := &Watcher{}
	w.current.Store(p)
	return w
}

// Watch loads the policy file at path (its extension names the format) and
// keeps it current until Close. It fails if the file is invalid at start.
//
// Changes are noticed through fsnotify on the file's directory, which also
// sees a file replaced by rename (editors, Kubernetes ConfigMap volumes),
// with a stat poll every few seconds as a fallback where events are lost
// (some network and overlay file systems). An invalid new version is logged
// (the error names the problem, never key material) and the last good
// policy stays in force.
func Watch(path string, logger *slog.Logger) (*Watcher, error) {
	return watch(path, logger, filewatch.Default)
}

func watch(path string, logger *slog.Logger, opts filewatch.Options) (*Watcher, error) {
	format, err := FormatForPath(path)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{
		path:   path,
		format: format,
		logger: logger.With("path", path),
	}
	if err := w.loadInitial(); err != nil {
		return nil, err
	}
	// An event reads the file; a poll only when its stat changed.
	w.files = filewatch.Start([]string{path}, opts, w.logger, "policy file", func(polled bool) {
		if !polled || w.statChanged() {
			w.reload()
		}
	})
	return w, nil
}

func (w *Watcher) loadInitial() error {
	// Stat before reading: if the file changes in between, the next poll
	// sees a newer stamp and reads it again.
	w.stamp, _ = os.Stat(w.path)
	data, err := os.ReadFile(w.path)
	if err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	p, err := Parse(data, w.format)
	if err != nil {
		return err
	}
	w.seen = sha256.Sum256(data)
	w.current.Store(p)
	w.logger.Info("policy loaded", "grants", p.grantCount, "api_keys", len(p.apiKeys))
	w.warn(p)
	return nil
}

// Current returns the policy in force. It never blocks.
func (w *Watcher) Current() *Policy {
	return w.current.Load()
}

// Close stops watching; Current keeps returning the last good policy.
func (w *Watcher) Close() error {
	if w.files == nil {
		return nil
	}
	return w.files.Close()
}

// statChanged reports whether the file looks different from when it was
// last read: another inode (replaced by rename), size or modification time.
func (w *Watcher) statChanged() bool {
	fi, err := os.Stat(w.path)
	if err != nil || w.stamp == nil {
		return (err == nil) != (w.stamp != nil)
	}
	return !os.SameFile(fi, w.stamp) || fi.Size() != w.stamp.Size() || !fi.ModTime().Equal(w.stamp.ModTime())
}

// reload reads the file and, if its content is new, parses it and puts it
// in force when valid. Content already seen, valid or not, is skipped, so a
// bad file is reported once rather than on every event or poll.
func (w *Watcher) reload() {
	w.stamp, _ = os.Stat(w.path)
	data, err := os.ReadFile(w.path)
	if err != nil {
		if err.Error() != w.readErr {
			w.readErr = err.Error()
			w.logger.Error("policy file unreadable; keeping the last good policy", "error", err)
		}
		w.seen = [sha256.Size]byte{} // whatever comes back is looked at
		return
	}
	w.readErr = ""
	digest := sha256.Sum256(data)
	if digest == w.seen {
		return
	}
	w.seen = digest
	p, err := Parse(data, w.format)
	if err != nil {
		w.logger.Error("policy file invalid; keeping the last good policy", "error", err)
		return
	}
	w.current.Store(p)
	w.logger.Info("policy reloaded", "grants", p.grantCount, "api_keys", len(p.apiKeys))
	w.warn(p)
}

// warn logs what the policy in force should change (old principal forms).
func (w *Watcher) warn(p *Policy) {
	for _, msg := range p.Warnings() {
		w.logger.Warn("policy file uses an old form; migrate it (docs/security.md)", "problem", msg)
	}
}
