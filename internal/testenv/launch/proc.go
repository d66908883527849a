package launch

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// procLogTail is how much of a child's output Proc keeps for errors.
const procLogTail = 8 << 10

// Proc is a child process that dies with its parent (see Fork), its output
// kept in a tail for error messages: a fleetbroker binary the bench
// measures, say.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	Log  *Tail

	done     <-chan struct{}
	dir      string // removed after the process is gone
	stopOnce sync.Once
}

// StartProc starts cmd, whose Stdout and Stderr must be unset; dir, if set,
// is removed once the process is stopped.
func StartProc(name string, cmd *exec.Cmd, dir string) (*Proc, error) {
	p := &Proc{Name: name, Cmd: cmd, Log: &Tail{Max: procLogTail}, dir: dir}
	cmd.Stdout, cmd.Stderr = p.Log, p.Log
	done, err := Fork(cmd, nil)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.done = done
	return p, nil
}

// Stop kills the process, waits for it (at most 5 s) and removes its
// directory. It may be called more than once.
func (p *Proc) Stop() {
	p.stopOnce.Do(func() {
		_ = p.Cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
		if p.dir != "" {
			_ = os.RemoveAll(p.dir)
		}
	})
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// WaitReady polls probe every 50 ms until it succeeds, the process exits or
// timeout passes.
func (p *Proc) WaitReady(timeout time.Duration, probe func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := probe()
		if err == nil {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("%s exited during startup; its output:\n%s", p.Name, p.Log)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v; its output:\n%s", p.Name, timeout, err, p.Log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ProcStats is what the kernel reports of one process.
type ProcStats struct {
	RSS     int64 // resident memory, bytes (VmRSS)
	HWM     int64 // peak resident memory, bytes (VmHWM)
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
		case (name == "VmRSS" || name == "VmHWM") && len(fields) == 2 && fields[1] == "kB":
			kb, err := strconv.ParseInt(fields[0], 10, 64)
			if err != nil {
				return st, fmt.Errorf("%s/status: %q: %w", dir, sc.Text(), err)
			}
			if name == "VmRSS" {
				st.RSS = kb << 10
			} else {
				st.HWM = kb << 10
			}
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
