package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// buildTimeout bounds one go build: a cold build of the whole binary with
// its dependencies on a busy 2-core CI machine takes a few minutes.
const buildTimeout = 10 * time.Minute

// builds are the binaries this test binary built, each built once: a test
// that needs the fleetbroker binary of this tree or of an earlier release
// shares it with every other test of the binary.
var builds = struct {
	mu   sync.Mutex
	dir  string // holds every binary; removed by Main
	done map[string]*buildResult
}{done: map[string]*buildResult{}}

type buildResult struct {
	once sync.Once
	bin  string
	err  error
}

// BuildWorkingTree builds the main package pkg (e.g. "./cmd/fleetbroker")
// of the module this test runs in, as the working tree has it, and returns
// the binary's path. It is built once per test binary.
func BuildWorkingTree(t testing.TB, pkg string) string {
	t.Helper()
	return build(t, "tree:"+pkg, func(ctx context.Context, out string) error {
		root, err := launch.ModuleRoot()
		if err != nil {
			return err
		}
		return launch.GoBuild(ctx, root, pkg, out)
	})
}

// BuildAtCommit builds the main package pkg as of commit — the module at
// that commit of the git repository holding this working tree, with its own
// go.mod — and returns the binary's path. It is built once per test binary.
//
// It needs git and the commit in the repository's history: a shallow clone
// without it fails the test (never skips it), saying to fetch the history.
func BuildAtCommit(t testing.TB, commit, pkg string) string {
	t.Helper()
	return build(t, "commit:"+commit+":"+pkg, func(ctx context.Context, out string) error {
		root, err := launch.ModuleRoot()
		if err != nil {
			return err
		}
		if _, err := exec.LookPath("git"); err != nil {
			return fmt.Errorf("git is needed to build %s at %s: %w", pkg, commit, err)
		}
		verify := exec.CommandContext(ctx, "git", "-C", root, "cat-file", "-e", commit+"^{commit}")
		if msg, err := verify.CombinedOutput(); err != nil {
			return fmt.Errorf("commit %s is not in the git history of %s (%v: %s): this test builds that earlier release, "+
				"so the repository must be cloned with its history — `git fetch --unshallow` (CI: actions/checkout with fetch-depth: 0)",
				commit, root, err, strings.TrimSpace(string(msg)))
		}
		src, err := os.MkdirTemp(builds.dir, "src-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(src)
		if err := gitExport(ctx, root, commit, src); err != nil {
			return err
		}
		// The module's directory within the repository, at that commit.
		top, err := exec.CommandContext(ctx, "git", "-C", root, "rev-parse", "--show-prefix").Output()
		if err != nil {
			return fmt.Errorf("git rev-parse --show-prefix: %w", err)
		}
		return launch.GoBuild(ctx, filepath.Join(src, strings.TrimSpace(string(top))), pkg, out)
	})
}

func build(t testing.TB, key string, do func(ctx context.Context, out string) error) string {
	t.Helper()
	builds.mu.Lock()
	if builds.dir == "" {
		dir, err := os.MkdirTemp("", "fleetbroker-testbuild-")
		if err != nil {
			builds.mu.Unlock()
			t.Fatalf("testenv: %v", err)
		}
		builds.dir = dir
	}
	r := builds.done[key]
	if r == nil {
		r = &buildResult{}
		builds.done[key] = r
	}
	dir := builds.dir
	builds.mu.Unlock()
	r.once.Do(func() {
		out, err := os.MkdirTemp(dir, "bin-")
		if err != nil {
			r.err = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
		defer cancel()
		r.bin = filepath.Join(out, "fleetbroker")
		r.err = do(ctx, r.bin)
	})
	if r.err != nil {
		t.Fatalf("testenv: build %s: %v", key, r.err)
	}
	return r.bin
}

// removeBuilds deletes every binary built; Main calls it after the tests.
func removeBuilds() {
	builds.mu.Lock()
	defer builds.mu.Unlock()
	if builds.dir != "" {
		_ = os.RemoveAll(builds.dir)
		builds.dir = ""
		builds.done = map[string]*buildResult{}
	}
}

// gitExport writes the tree of commit into dir (git archive, unpacked
// here: no worktree is registered, nothing in the repository changes).
func gitExport(ctx context.Context, root, commit, dir string) error {
	var archive, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "git", "-C", root, "archive", "--format=tar", commit)
	cmd.Stdout, cmd.Stderr = &archive, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("git archive %s: %w: %s", commit, err, strings.TrimSpace(stderr.String()))
	}
	tr := tar.NewReader(&archive)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("git archive %s: %w", commit, err)
		}
		name := path.Clean(h.Name)
		if name == "." || strings.HasPrefix(name, "../") || path.IsAbs(name) {
			continue
		}
		target := filepath.Join(dir, filepath.FromSlash(name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode)&0o755|0o600)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return err
			}
			if err := os.Symlink(h.Linkname, target); err != nil {
				return err
			}
		}
	}
}
