// Package filewatch tells its caller when files it serves from memory may
// have changed on disk: the one watch loop behind the policy file
// (internal/policy) and the TLS material (internal/tlsutil), both re-read
// while the server runs.
//
// It watches the files' directories with fsnotify, not the files: editors
// and Kubernetes replace a file by renaming another over it (or by swapping
// a symlinked "..data" directory), which a watch on the old inode would
// never report. A burst of events (a truncate then a write, a certificate
// then its key) is let settle before the caller is told, and a poll runs
// as well, for file systems that lose events (some network and overlay
// file systems) or where fsnotify cannot start.
//
// It never reads the files and never decides whether they changed: the
// caller's check does, and keeps its last good value when the new one is
// bad.
package filewatch

import (
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Options are the timings of a Watcher; tests shorten them.
type Options struct {
	// Notify watches the files' directories with fsnotify; without it the
	// poll alone notices changes.
	Notify bool
	// Poll is how often the caller checks regardless of events.
	Poll time.Duration
	// Settle is the quiet time after an event before the caller checks.
	Settle time.Duration
}

// Default is what production uses: events settled for 100 ms, and a poll
// every 5 s in case events are lost.
var Default = Options{Notify: true, Poll: 5 * time.Second, Settle: 100 * time.Millisecond}

// Watcher runs check until Close.
type Watcher struct {
	notify    *fsnotify.Watcher // nil when polling only
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Start calls check from one goroutine — polled false after a settled
// burst of events in a directory of files, true on each poll tick — until
// Close. Any event in a watched directory counts, not only one naming a
// file: a Kubernetes secret update renames "..data", never the file. what
// names the files in the log ("policy file", "tls"); failing to watch is
// logged and not fatal, since the poll still runs.
func Start(files []string, opts Options, logger *slog.Logger, what string, check func(polled bool)) *Watcher {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{stop: make(chan struct{}), done: make(chan struct{})}
	if opts.Notify {
		w.notify = watchDirs(files, logger, what)
	}
	go w.run(opts, logger, what, check)
	return w
}

// watchDirs watches the directories holding files; nil when fsnotify
// cannot start at all.
func watchDirs(files []string, logger *slog.Logger, what string) *fsnotify.Watcher {
	n, err := fsnotify.NewWatcher()
	if err != nil {
		logger.Warn(what+": no change notifications, polling only", "error", err)
		return nil
	}
	dirs := make([]string, 0, len(files))
	for _, f := range files {
		dirs = append(dirs, filepath.Dir(f))
	}
	slices.Sort(dirs)
	for _, dir := range slices.Compact(dirs) {
		if err := n.Add(dir); err != nil {
			logger.Warn(what+": cannot watch directory, polling only", "dir", dir, "error", err)
		}
	}
	return n
}

func (w *Watcher) run(opts Options, logger *slog.Logger, what string, check func(polled bool)) {
	defer close(w.done)
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w.notify != nil {
		events, errs = w.notify.Events, w.notify.Errors
	}
	poll := time.NewTicker(opts.Poll)
	defer poll.Stop()
	// Writers often truncate, then write, or write in pieces: wait for the
	// events to settle rather than read a half-written file.
	settle := time.NewTimer(opts.Settle)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-w.stop:
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle.Reset(opts.Settle)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			logger.Warn(what+": change notification error, polling still runs", "error", err)
		case <-settle.C:
			check(false)
		case <-poll.C:
			check(true)
		}
	}
}

// Close stops the watch and waits for a check under way to return. It may
// be called more than once.
func (w *Watcher) Close() error {
	w.closeOnce.Do(func() {
		close(w.stop)
		<-w.done
		if w.notify != nil {
			w.closeErr = w.notify.Close()
		}
	})
	return w.closeErr
}
