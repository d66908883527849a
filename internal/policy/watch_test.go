package policy

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/filewatch"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// reloadWait bounds how long a change may take to apply. The watchers under
// test poll every 20 ms or react to events after a 20 ms pause.
const reloadWait = 5 * time.Second

// grantYAML is a one-grant policy letting principal read tenant "acme".
func grantYAML(principal string) string {
	return "grants:\n  - principals: ['dns:" + principal + "']\n    tenants: [acme]\n    actions: [credentials.read]\n"
}

// syncBuffer is a log sink the watcher goroutine writes while a test reads.
type syncBuffer = testenv.LogBuffer

// replaceFile writes data next to path and renames it over path, as editors
// and deployment tools do.
func replaceFile(t *testing.T, path, data string) {
	t.Helper()
	replaceFileAt(t, path, data, time.Time{})
}

// replaceFileAt is replaceFile giving the new file modification time mtime,
// unless it is zero.
func replaceFileAt(t *testing.T, path, data string, mtime time.Time) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if !mtime.IsZero() {
		if err := os.Chtimes(tmp, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// writeInPlace truncates and rewrites path, then sets its modification time
// to mtime, so the change is visible to a poll even on a file system with
// coarse timestamps.
func writeInPlace(t *testing.T, path, data string, mtime time.Time) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

func startWatch(t *testing.T, opts filewatch.Options, initial string) (*Watcher, string, *syncBuffer) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(initial), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	w, err := watch(path, slog.New(slog.NewTextHandler(logs, nil)), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w, path, logs
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(reloadWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", reloadWait, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func allows(w *Watcher, principal string) func() bool {
	return func() bool { return w.Current().Allowed("dns:"+principal, CredentialsRead, "acme") }
}

// TestWatchReloads runs the same sequence with change notifications (and a
// poll too slow to matter) and with the poll alone: a good change applies, a
// bad one is logged and leaves the last good policy in force, and a later
// good change applies again.
func TestWatchReloads(t *testing.T) {
	for name, opts := range map[string]filewatch.Options{
		"fsnotify": {Notify: true, Poll: time.Hour, Settle: 20 * time.Millisecond},
		"poll":     {Notify: false, Poll: 20 * time.Millisecond},
	} {
		t.Run(name, func(t *testing.T) {
			w, path, logs := startWatch(t, opts, grantYAML("alice"))
			if !allows(w, "alice")() {
				t.Fatal("initial policy not in force")
			}

			// Same size and modification time as the old file: only its
			// being another file (inode) says it changed.
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			replaceFileAt(t, path, grantYAML("bobby"), fi.ModTime())
			waitFor(t, "rename to a new policy applies", allows(w, "bobby"))
			if allows(w, "alice")() {
				t.Error("the old grant survived the reload")
			}

			// A key pasted where its hash belongs: invalid, and the log must
			// not repeat it.
			const key = "fbk_LiveSecretValue1234567890"
			bad := "api_keys:\n  - principal: k\n    sha256: " + key + "\n" + grantYAML("carol")
			replaceFile(t, path, bad)
			waitFor(t, "invalid policy logged", func() bool { return strings.Contains(logs.String(), "api_keys[0].sha256") })
			if !allows(w, "bobby")() || allows(w, "carol")() {
				t.Error("an invalid policy replaced the last good one")
			}
			if strings.Contains(logs.String(), key[:7]) {
				t.Errorf("the log repeats key material:\n%s", logs)
			}

			writeInPlace(t, path, grantYAML("dave"), time.Now().Add(time.Minute))
			waitFor(t, "a good policy after a bad one applies", allows(w, "dave"))

			// Same file, same size: only the modification time says it changed.
			erinTime := time.Now().Add(2 * time.Minute)
			writeInPlace(t, path, grantYAML("erin"), erinTime)
			waitFor(t, "a same-size change in place applies", allows(w, "erin"))

			// Same file, same modification time (a coarse clock): only the
			// size says it changed.
			writeInPlace(t, path, grantYAML("frank"), erinTime)
			waitFor(t, "a same-time change in place applies", allows(w, "frank"))
		})
	}
}

// TestWatchReportsBadVersionOnce checks that an invalid file is reported
// once, not again on every poll or event that finds the same content
// (here: its modification time touched).
func TestWatchReportsBadVersionOnce(t *testing.T) {
	w, path, logs := startWatch(t, filewatch.Options{Notify: false, Poll: 5 * time.Millisecond}, grantYAML("alice"))
	replaceFile(t, path, "grants: [")
	waitFor(t, "invalid policy logged", func() bool { return strings.Contains(logs.String(), "policy file invalid") })
	for i := range 3 {
		touched := time.Now().Add(time.Duration(i+1) * time.Minute)
		if err := os.Chtimes(path, touched, touched); err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Millisecond) // a few polls
	}
	if n := strings.Count(logs.String(), "policy file invalid"); n != 1 {
		t.Errorf("the invalid version was logged %d times:\n%s", n, logs)
	}
	if !allows(w, "alice")() {
		t.Error("last good policy lost")
	}
}

func TestWatchRejectsInvalidStart(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{"bad.yaml": "grants: []\n", "bad.txt": grantYAML("a")} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if w, err := Watch(path, nil); err == nil {
			w.Close()
			t.Errorf("Watch(%s) accepted an invalid file", name)
		}
	}
	if _, err := Watch(filepath.Join(dir, "missing.yaml"), nil); err == nil {
		t.Error("Watch accepted a missing file")
	}
}

func TestWatchCloseKeepsPolicy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.json")
	data := `{"grants": [{"principals": ["dns:alice"], "tenants": ["acme"], "actions": ["credentials.read"]}]}`
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := Watch(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if !allows(w, "alice")() {
		t.Error("Current after Close lost the policy")
	}
}

func TestStatic(t *testing.T) {
	var s Source = Static(AllowAll())
	if !s.Current().Allowed("x", SessionsResolve, "t") {
		t.Error("Static does not serve its policy")
	}
	if err := s.(*Watcher).Close(); err != nil {
		t.Error(err)
	}
}

// TestWatchConfigMapSwap follows a Kubernetes ConfigMap volume update: the
// file is a symlink through "..data", and an update renames a new "..data"
// symlink over the old one. Nothing happens to the file's own name, so only
// watching the directory and re-reading through the link sees the change.
func TestWatchConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	writeVersion := func(version, data string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(dir, version), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, version, "policy.yaml"), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(version, filepath.Join(dir, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	writeVersion("..v1", grantYAML("alice"))
	path := filepath.Join(dir, "policy.yaml")
	if err := os.Symlink(filepath.Join("..data", "policy.yaml"), path); err != nil {
		t.Fatal(err)
	}
	w, err := watch(path, nil, filewatch.Options{Notify: true, Poll: time.Hour, Settle: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	writeVersion("..v2", grantYAML("bob"))
	waitFor(t, "the swapped ConfigMap version applies", allows(w, "bob"))
}
