package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// Process is a child process of one test — a fleetbroker binary, say —
// that the test may signal (SIGTERM for a rolling update, SIGKILL for a
// crash), wait for and sample. Its output goes to a file in the test's
// temporary directory. It dies with the test binary (Pdeathsig), and is
// killed when the test ends if it still runs.
type Process struct {
	// Name names the process in messages, e.g. "gateway-1 (a4d8f9a)".
	Name string
	// LogPath is the file holding its stdout and stderr.
	LogPath string

	cmd  *exec.Cmd
	done <-chan struct{}
	err  error // cmd.Wait's result, set before done is closed

	stopping sync.Once
	ended    atomic.Bool // the test ended it (Terminate, Kill, cleanup)
}

// StartProcess starts cmd, whose Stdout and Stderr must be unset, for t.
func StartProcess(t testing.TB, name string, cmd *exec.Cmd) *Process {
	t.Helper()
	p := &Process{Name: name, LogPath: filepath.Join(t.TempDir(), "output.log"), cmd: cmd}
	out, err := os.Create(p.LogPath)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer out.Close() // the child has its own descriptor
	cmd.Stdout, cmd.Stderr = out, out
	exited, err := launch.Fork(cmd, func(waitErr error) { p.err = waitErr })
	if err != nil {
		t.Fatalf("testenv: start %s: %v", name, err)
	}
	p.done = exited
	t.Cleanup(func() {
		if !p.Exited() {
			p.ended.Store(true)
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Crashed reports whether the process has exited without the test ending
// it (Terminate, Kill, or the end of the test).
func (p *Process) Crashed() bool { return p.Exited() && !p.ended.Load() }

// Err is how the process ended (nil: exit status 0); valid once Done.
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// Output is everything the process wrote so far.
func (p *Process) Output() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", p.LogPath, err)
	}
	return string(b)
}

// Terminate sends SIGTERM, as Kubernetes and docker compose stop a
// container, and waits up to grace for the process to exit; then it kills
// it, as they do when the grace period is over, and reports that. It
// returns how the process ended.
func (p *Process) Terminate(t testing.TB, grace time.Duration) error {
	t.Helper()
	var err error
	p.ended.Store(true)
	p.stopping.Do(func() {
		if sigErr := p.cmd.Process.Signal(syscall.SIGTERM); sigErr != nil && !errors.Is(sigErr, os.ErrProcessDone) {
			t.Errorf("testenv: SIGTERM %s: %v", p.Name, sigErr)
		}
		select {
		case <-p.done:
			err = p.err
		case <-time.After(grace):
			_ = p.cmd.Process.Kill()
			<-p.done
			err = fmt.Errorf("%s did not exit within %s of SIGTERM and was killed", p.Name, grace)
		}
	})
	return err
}

// Kill crashes the process (SIGKILL) and waits for it.
func (p *Process) Kill(t testing.TB) {
	t.Helper()
	p.ended.Store(true)
	_ = p.cmd.Process.Kill()
	<-p.done
}

// ProcStats is what the kernel reports of one process.
type ProcStats = launch.ProcStats

// ReadProcStats samples process pid from /proc (Linux).
func ReadProcStats(pid int) (ProcStats, error) { return launch.ReadProcStats(pid) }
