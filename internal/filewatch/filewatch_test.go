package filewatch

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestStart: a file replaced by rename in a watched directory is reported
// as an event (polled false) after the settle time, and without
// notifications the poll (polled true) reports instead; Close ends the
// goroutine that calls check.
func TestStart(t *testing.T) {
	tests := []struct {
		name       string
		opts       Options
		wantPolled bool
	}{
		{"events", Options{Notify: true, Poll: time.Hour, Settle: 10 * time.Millisecond}, false},
		{"poll only", Options{Notify: false, Poll: 10 * time.Millisecond}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "watched")
			if err := os.WriteFile(path, []byte("one"), 0o600); err != nil {
				t.Fatal(err)
			}
			checks := make(chan bool, 100)
			w := Start([]string{path}, tt.opts, nil, "test", func(polled bool) { checks <- polled })
			if err := os.WriteFile(path+".tmp", []byte("two"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(path+".tmp", path); err != nil {
				t.Fatal(err)
			}
			select {
			case polled := <-checks:
				if polled != tt.wantPolled {
					t.Errorf("check(polled=%v), want polled=%v", polled, tt.wantPolled)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no check within 5s of the change")
			}
			if err := w.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := w.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			// Close returns only once the goroutine that calls check ended.
			select {
			case <-w.done:
			default:
				t.Error("the watch still runs after Close")
			}
		})
	}
}
