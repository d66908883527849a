package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
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
	done chan struct{}
	err  error // cmd.Wait's result, set before done is closed

	stopping sync.Once
	ended    atomic.Bool // the test ended it (Terminate, Kill, cleanup)
}

// StartProcess starts cmd, whose Stdout and Stderr must be unset, for t.
func StartProcess(t testing.TB, name string, cmd *exec.Cmd) *Process {
	t.Helper()
	p := &Process{Name: name, LogPath: filepath.Join(t.TempDir(), "output.log"), cmd: cmd, done: make(chan struct{})}
	out, err := os.Create(p.LogPath)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer out.Close() // the child has its own descriptor
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// Fork from a thread that lives as long as the child: Pdeathsig fires
	// when the forking thread exits (see redisProc.start).
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		t.Fatalf("testenv: start %s: %v", name, err)
	}
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
type ProcStats struct {
	RSS     int64 // resident memory, bytes (VmRSS)
	FDs     int   // open file descriptors
	Threads int
}

// ReadProcStats samples process pid from /proc (Linux).
func ReadProcStats(pid int) (ProcStats, error) {
	var st ProcStats
	dir := "/proc/" + strconv.Itoa(pid)
	f, err := os.Open(dir + "/status")
	if err != nil {
		return st, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(value)
		switch {
		case name == "VmRSS" && len(fields) == 2 && fields[1] == "kB":
			kb, err := strconv.ParseInt(fields[0], 10, 64)
			if err != nil {
				return st, fmt.Errorf("%s/status: %q: %w", dir, sc.Text(), err)
			}
			st.RSS = kb << 10
		case name == "Threads" && len(fields) == 1:
			st.Threads, _ = strconv.Atoi(fields[0])
		}
	}
	if err := sc.Err(); err != nil {
		return st, err
	}
	if st.RSS == 0 {
		return st, fmt.Errorf("%s/status has no VmRSS", dir)
	}
	fds, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return st, err
	}
	st.FDs = len(fds)
	return st, nil
}
