package launch

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RedisBinEnv names the environment variable that overrides the redis-server
// binary; otherwise redis-server is looked up on PATH.
const RedisBinEnv = "FLEETBROKER_REDIS_BIN"

// Timings of a redis-server start.
const (
	redisStartAttempts = 5
	redisStopTimeout   = 5 * time.Second
	redisLogTail       = 4 << 10
)

// RedisBinary finds redis-server, or says how to install it.
func RedisBinary() (string, error) {
	if bin := os.Getenv(RedisBinEnv); bin != "" {
		if _, err := exec.LookPath(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w; install redis-server with: apt-get install -y redis-server", RedisBinEnv, bin, err)
		}
		return bin, nil
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", fmt.Errorf("redis-server not found on PATH and %s is not set; "+
			"install it with: apt-get install -y redis-server", RedisBinEnv)
	}
	return bin, nil
}

// RedisBaseArgs are the settings every data node shares: loopback only, no
// persistence (the data dies with its parent anyway) and a log of warnings
// only, the part worth showing when a start fails.
func RedisBaseArgs(dir string) []string {
	return []string{
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--loglevel", "warning",
	}
}

// RedisSpec says how to start one redis-server process.
type RedisSpec struct {
	// Role names the process in errors, e.g. "cluster node 2".
	Role string
	// Ports is how many free loopback ports Args needs (a cluster node
	// also needs a bus port); the first is the client address. Default 1.
	Ports int
	// Args returns the command line. It may write files into dir, the
	// process's own directory, removed when the process is stopped.
	Args func(dir string, ports []int) ([]string, error)
	// Probe tells whether the server at addr serves; nil means PING.
	Probe func(addr string) error
}

// ErrRedisExited is a redis-server that exited during its start (on a port
// another process took first, say).
var ErrRedisExited = errors.New("redis-server exited during startup")

// RedisProc is a running redis-server child process.
type RedisProc struct {
	Role string
	Addr string
	Dir  string
	Cmd  *exec.Cmd
	Log  *Tail
	// Done is closed when the process has exited.
	Done <-chan struct{}

	stopOnce sync.Once
}

// StartRedis launches a server of spec on free loopback ports and waits
// until it answers, at most until deadline. An early exit (a port taken
// between probing and binding) is retried on new ports.
func StartRedis(bin string, spec RedisSpec, deadline time.Time) (*RedisProc, error) {
	n := max(spec.Ports, 1)
	var lastErr error
	for range redisStartAttempts {
		ports, err := FreePorts(n)
		if err != nil {
			return nil, err
		}
		p, err := launchRedis(bin, spec, ports, deadline)
		if err == nil {
			return p, nil
		}
		lastErr = err
		if !errors.Is(err, ErrRedisExited) {
			break
		}
	}
	return nil, fmt.Errorf("start %s: %w", spec.Role, lastErr)
}

// StartPlainRedis starts one standalone redis-server without persistence
// ($FLEETBROKER_REDIS_BIN or PATH), ready within timeout.
func StartPlainRedis(timeout time.Duration) (*RedisProc, error) {
	bin, err := RedisBinary()
	if err != nil {
		return nil, err
	}
	return StartRedis(bin, RedisSpec{
		Role: "redis-server",
		Args: func(dir string, ports []int) ([]string, error) {
			return append(RedisBaseArgs(dir), "--port", strconv.Itoa(ports[0])), nil
		},
	}, time.Now().Add(timeout))
}

func launchRedis(bin string, spec RedisSpec, ports []int, deadline time.Time) (*RedisProc, error) {
	dir, err := os.MkdirTemp("", "fleetbroker-redis-")
	if err != nil {
		return nil, err
	}
	args, err := spec.Args(dir, ports)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %w", spec.Role, err)
	}
	p := &RedisProc{
		Role: spec.Role,
		Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		Dir:  dir,
		Log:  &Tail{Max: redisLogTail},
	}
	p.Cmd = exec.Command(bin, args...)
	p.Cmd.Stdout, p.Cmd.Stderr = p.Log, p.Log
	if p.Done, err = Fork(p.Cmd, nil); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("run %s: %w", bin, err)
	}
	probe := spec.Probe
	if probe == nil {
		probe = RedisPing
	}
	if err := p.WaitReady(deadline, probe); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// NewRedisProc starts cmd as the redis-server of role at addr in dir (a
// restartable server that keeps its own directory and port), logging into
// a tail, without waiting for it.
func NewRedisProc(role, addr, dir string, cmd *exec.Cmd) (*RedisProc, error) {
	p := &RedisProc{Role: role, Addr: addr, Dir: dir, Cmd: cmd, Log: &Tail{Max: redisLogTail}}
	cmd.Stdout, cmd.Stderr = p.Log, p.Log
	done, err := Fork(cmd, nil)
	if err != nil {
		return nil, err
	}
	p.Done = done
	return p, nil
}

// WaitReady polls probe until the server answers, exits (ErrRedisExited)
// or deadline passes.
func (p *RedisProc) WaitReady(deadline time.Time, probe func(addr string) error) error {
	for {
		err := probe(p.Addr)
		if err == nil {
			return nil
		}
		select {
		case <-p.Done:
			return fmt.Errorf("%w: %s on %s; its output:\n%s", ErrRedisExited, p.Role, p.Addr, p.Log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s on %s did not answer PING in time: %v; its output:\n%s",
				p.Role, p.Addr, err, p.Log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop terminates the server (SIGTERM, then SIGKILL after 5 s), waits for
// it and removes its directory. It may be called more than once.
func (p *RedisProc) Stop() {
	p.stopOnce.Do(func() {
		_ = p.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.Done:
		case <-time.After(redisStopTimeout):
			_ = p.Cmd.Process.Kill()
			<-p.Done
		}
		_ = os.RemoveAll(p.Dir)
	})
}

// RedisPing tells whether a server answers PING at addr.
func RedisPing(addr string) error {
	return RedisProbe(func() (net.Conn, error) { return net.DialTimeout("tcp", addr, time.Second) })
}

// RedisProbe dials, sends AUTH if auth (user, password) is given, then
// PING. It speaks raw RESP rather than go-redis, whose pool would log every
// refused dial while the server is still starting.
func RedisProbe(dial func() (net.Conn, error), auth ...string) error {
	conn, err := dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	var cmds [][]string
	if len(auth) > 0 {
		cmds = append(cmds, append([]string{"AUTH"}, auth...))
	}
	cmds = append(cmds, []string{"PING"})
	r := bufio.NewReader(conn)
	for _, cmd := range cmds {
		if _, err := conn.Write(RESPCommand(cmd...)); err != nil {
			return err
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		want := "+OK"
		if cmd[0] == "PING" {
			want = "+PONG"
		}
		if got := strings.TrimSpace(line); got != want {
			return fmt.Errorf("%s answered %q", cmd[0], got)
		}
	}
	return nil
}

// RESPCommand encodes a command as a RESP array of bulk strings, which,
// unlike an inline command, carries any byte in an argument.
func RESPCommand(args ...string) []byte {
	b := fmt.Appendf(nil, "*%d\r\n", len(args))
	for _, a := range args {
		b = fmt.Appendf(b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b
}
