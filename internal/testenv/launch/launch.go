// Package launch starts the real dependencies fleetbroker runs against — a
// redis-server and a Vault dev server on loopback — as child processes that
// die with their parent. It is the one starter behind both internal/testenv
// (the tests) and cmd/fleetbroker-bench (the benchmark), and so imports no
// `testing`: a test failure is the caller's to report.
//
// It must never start anything listening beyond 127.0.0.1, and never read a
// developer's VAULT_* settings into a server it starts.
package launch

import (
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// Fork starts cmd so that it dies with this process, and returns a channel
// closed once it has exited; onExit, if set, is given cmd.Wait's result
// before the channel is closed.
//
// The kernel kills the child when its parent dies (Pdeathsig), so a crashed
// or killed test binary or bench leaves no server behind. Pdeathsig fires
// when the forking *thread* ends, not the process, and the Go runtime may end
// a thread under an unrelated goroutine; the fork is therefore made from a
// goroutine locked to its thread until the child exits.
func Fork(cmd *exec.Cmd, onExit func(waitErr error)) (<-chan struct{}, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	done := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread exits with this goroutine, which
		// only returns after the child is gone.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		if onExit != nil {
			onExit(err)
		}
		close(done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return done, nil
}

// FreePorts returns n distinct free loopback ports: all n listeners are open
// at once, so the kernel cannot hand out one port twice. Another process may
// still take a port before the server binds it; starters retry on new ones.
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Tail keeps the last Max bytes written to it: enough of a server's log to
// explain a failed start without growing for the process's lifetime.
type Tail struct {
	Max int

	mu  sync.Mutex
	buf []byte
}

func (t *Tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.Max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *Tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
