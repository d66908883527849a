package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
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

	"github.com/redis/go-redis/v9"
)

// RedisBinEnv names the environment variable that overrides the redis-server
// binary; otherwise redis-server is looked up on PATH.
const RedisBinEnv = "FLEETBROKER_REDIS_BIN"

const (
	redisStartAttempts = 5
	redisReadyTimeout  = 15 * time.Second
	redisStopTimeout   = 5 * time.Second
	redisLogTail       = 4 << 10
)

// RedisServer is a redis-server started for this test binary.
type RedisServer struct {
	// Addr is host:port on loopback.
	Addr string
	// Cluster is set for the single-node Redis Cluster from RedisCluster.
	Cluster bool
}

// Client returns a client for the server, closed when t ends: a
// *redis.ClusterClient for a cluster server, a *redis.Client otherwise.
// ContextTimeoutEnabled is on, so a context deadline bounds every call, as it
// must in production.
func (s RedisServer) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 []string{s.Addr},
		IsClusterMode:         s.Cluster,
		ContextTimeoutEnabled: true,
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// redisInstance is one lazily started server; the test binary shares it.
type redisInstance struct {
	cluster bool

	mu      sync.Mutex
	started bool // a start was attempted; proc and err hold its outcome
	proc    *redisProc
	err     error
}

var (
	redisStandalone = &redisInstance{}
	redisCluster    = &redisInstance{cluster: true}
	redisPrefixSeq  atomic.Int64
)

// Redis returns the test binary's standalone redis-server, starting it on
// first use. A missing or broken redis-server fails the test: it is a
// required dependency, never a reason to skip.
func Redis(t testing.TB) RedisServer {
	t.Helper()
	return redisStandalone.get(t)
}

// RedisCluster returns the test binary's single-node Redis Cluster (one
// master owning all 16384 slots), starting it on first use. Clients must use
// cluster mode, and the server rejects every multi-key command or script
// whose keys span hash slots (CROSSSLOT), so running code against it proves
// the code's key layout is cluster-safe.
func RedisCluster(t testing.TB) RedisServer {
	t.Helper()
	return redisCluster.get(t)
}

// RedisPrefix returns a key prefix unique within the test binary, so tests
// can share one server without seeing each other's keys. It contains only
// [A-Za-z0-9_-], so it is safe inside hash tags and SCAN patterns.
func RedisPrefix(t testing.TB) string {
	t.Helper()
	name := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-':
			return r
		default:
			return '_'
		}
	}, t.Name())
	if len(name) > 40 {
		name = name[len(name)-40:]
	}
	return fmt.Sprintf("t%d-%s", redisPrefixSeq.Add(1), name)
}

// StopRedis stops the servers this binary started and removes their
// directories. The package's Main calls it after the tests; without it the
// servers still die with the binary (see launchRedis).
func StopRedis() {
	for _, inst := range []*redisInstance{redisStandalone, redisCluster} {
		inst.stop()
	}
}

func (inst *redisInstance) get(t testing.TB) RedisServer {
	t.Helper()
	inst.mu.Lock()
	defer inst.mu.Unlock()
	// A failed start is remembered, not retried: every later test fails
	// at once with the same message instead of waiting out the timeout.
	if !inst.started {
		inst.started = true
		inst.proc, inst.err = startRedis(inst.cluster)
	}
	if inst.err != nil {
		t.Fatalf("testenv: %v", inst.err)
	}
	return RedisServer{Addr: inst.proc.addr, Cluster: inst.cluster}
}

func (inst *redisInstance) stop() {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if inst.proc != nil {
		inst.proc.stop()
		inst.proc, inst.err = nil, errors.New("redis-server already stopped by StopRedis")
	}
}

// redisBinary finds redis-server, or says how to install it.
func redisBinary() (string, error) {
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

// startRedis launches a server on a free loopback port. The port is picked
// by binding :0 and releasing it, so another process may grab it before
// redis-server binds; an early exit is therefore retried on a new port.
func startRedis(cluster bool) (*redisProc, error) {
	bin, err := redisBinary()
	if err != nil {
		return nil, err
	}
	var lastErr error
	for range redisStartAttempts {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		p, err := launchRedis(bin, port, cluster)
		if err == nil {
			return p, nil
		}
		lastErr = err
		if !errors.Is(err, errRedisExited) {
			break
		}
	}
	return nil, fmt.Errorf("start redis-server: %w", lastErr)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

var errRedisExited = errors.New("redis-server exited during startup")

// redisProc is a running redis-server child process.
type redisProc struct {
	addr     string
	dir      string
	cmd      *exec.Cmd
	log      *tailBuffer
	done     chan struct{} // closed when the process has exited
	stopOnce sync.Once
}

func launchRedis(bin string, port int, cluster bool) (*redisProc, error) {
	dir, err := os.MkdirTemp("", "fleetbroker-redis-")
	if err != nil {
		return nil, err
	}
	args := []string{
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--loglevel", "warning",
	}
	if cluster {
		args = append(args,
			"--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(dir, "nodes.conf"),
			// Without an announced address the lone node reports an empty
			// IP in CLUSTER SLOTS.
			"--cluster-announce-ip", "127.0.0.1",
		)
	}
	p := &redisProc{
		addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		dir:  dir,
		log:  &tailBuffer{max: redisLogTail},
		done: make(chan struct{}),
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	// The kernel kills the server when its parent dies, so a crashed or
	// killed test binary leaves no redis-server behind.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.start(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("run %s: %w", bin, err)
	}
	if err := p.waitReady(cluster); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// start forks the server from a goroutine locked to its OS thread until the
// server exits. Pdeathsig fires when the forking *thread* exits, not the
// process, and the Go runtime may end a thread under an unrelated goroutine;
// pinning the fork to a thread that outlives the child keeps the signal for
// the death of the test binary.
func (p *redisProc) start() error {
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread exits with this goroutine, which
		// only returns after the child is gone.
		if err := p.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = p.cmd.Wait()
		close(p.done)
	}()
	return <-started
}

func (p *redisProc) waitReady(cluster bool) error {
	deadline := time.Now().Add(redisReadyTimeout)
	if err := p.waitPing(deadline); err != nil {
		return err
	}
	if cluster {
		return redisClaimAllSlots(p.addr, deadline)
	}
	return nil
}

func (p *redisProc) waitPing(deadline time.Time) error {
	for {
		err := redisPing(p.addr)
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%w on %s; its output:\n%s", errRedisExited, p.addr, p.log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s did not answer PING within %s: %v; its output:\n%s",
				p.addr, redisReadyTimeout, err, p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// redisPing speaks raw RESP rather than go-redis, whose pool would log every
// refused dial while the server is still starting.
func redisPing(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// redisClaimAllSlots makes the lone cluster node own every slot and waits
// until it reports the cluster healthy.
func redisClaimAllSlots(addr string, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	c := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	defer c.Close()
	if err := c.ClusterAddSlotsRange(ctx, 0, 16383).Err(); err != nil {
		return fmt.Errorf("redis cluster on %s: assign slots: %w", addr, err)
	}
	for {
		info, err := c.ClusterInfo(ctx).Result()
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("redis cluster on %s never reached cluster_state:ok (last error: %v)", addr, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop terminates the server, waits for it and removes its directory.
func (p *redisProc) stop() {
	p.stopOnce.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(redisStopTimeout):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		_ = os.RemoveAll(p.dir)
	})
}

// tailBuffer keeps the last max bytes written: enough of the server's log
// to explain a failed start without growing for the binary's lifetime.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
