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
	"slices"
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

// RedisDeployment is a Redis deployment of several processes on loopback,
// started once per test binary: a sharded Cluster (RedisShardedCluster) or
// a master and replica watched by Sentinels (RedisSentinel). Tests share
// it: keep to RedisPrefix keys, and never stop, fail over or reconfigure
// its nodes.
type RedisDeployment struct {
	// Addrs are the addresses a client is given: every master of a
	// Cluster, or every Sentinel.
	Addrs []string
	// MasterName is the name the Sentinels know the master by; empty for
	// a Cluster.
	MasterName string
	// Nodes are the data nodes: the masters of a Cluster; the master, then
	// the replica, of a Sentinel deployment.
	Nodes []string
}

// Options returns new options for the deployment, as production passes
// them to redis.NewUniversalClient: several Addrs without a MasterName
// give a *redis.ClusterClient, a MasterName a Sentinel-backed
// *redis.Client. ContextTimeoutEnabled is on, as in Client.
func (d RedisDeployment) Options() *redis.UniversalOptions {
	return &redis.UniversalOptions{
		Addrs:                 slices.Clone(d.Addrs),
		MasterName:            d.MasterName,
		ContextTimeoutEnabled: true,
	}
}

// Client returns a client for the deployment, closed when t ends.
func (d RedisDeployment) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewUniversalClient(d.Options())
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// redisShared is one lazily started deployment; the test binary shares it.
type redisShared[T any] struct {
	start func() (T, redisGroup, error)

	mu      sync.Mutex
	started bool // a start was attempted; val, procs and err hold its outcome
	val     T
	procs   redisGroup
	err     error
}

var (
	redisStandalone = &redisShared[RedisServer]{start: func() (RedisServer, redisGroup, error) {
		return startRedisServer(false)
	}}
	redisCluster = &redisShared[RedisServer]{start: func() (RedisServer, redisGroup, error) {
		return startRedisServer(true)
	}}
	redisShardedCluster = &redisShared[RedisDeployment]{start: startRedisShardedCluster}
	redisSentinel       = &redisShared[RedisDeployment]{start: startRedisSentinel}

	redisPrefixSeq atomic.Int64
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
// the code's key layout is cluster-safe. RedisShardedCluster is the
// deployed shape, with keys spread over several processes.
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

// StopRedis stops the servers and deployments this binary started and
// removes their directories. The package's Main calls it after the tests;
// without it the servers still die with the binary (see redisProc.start).
func StopRedis() {
	var wg sync.WaitGroup
	for _, s := range []interface{ stop() }{redisStandalone, redisCluster, redisShardedCluster, redisSentinel} {
		wg.Go(s.stop)
	}
	wg.Wait()
}

func (s *redisShared[T]) get(t testing.TB) T {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	// A failed start is remembered, not retried: every later test fails
	// at once with the same message instead of waiting out the timeout.
	if !s.started {
		s.started = true
		s.val, s.procs, s.err = s.start()
	}
	if s.err != nil {
		t.Fatalf("testenv: %v", s.err)
	}
	return s.val
}

func (s *redisShared[T]) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.procs != nil {
		s.procs.stop()
		s.procs, s.err = nil, errors.New("redis already stopped by StopRedis")
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

// startRedisServer starts the standalone server or, with cluster, the
// single-node cluster.
func startRedisServer(cluster bool) (RedisServer, redisGroup, error) {
	bin, err := redisBinary()
	if err != nil {
		return RedisServer{}, nil, err
	}
	deadline := time.Now().Add(redisReadyTimeout)
	p, err := startRedisProc(bin, redisSpec{
		role: "redis-server",
		args: func(dir string, ports []int) ([]string, error) {
			args := append(redisBaseArgs(dir), "--port", strconv.Itoa(ports[0]))
			if cluster {
				args = append(args,
					"--cluster-enabled", "yes",
					"--cluster-config-file", filepath.Join(dir, "nodes.conf"),
					// Without an announced address the lone node reports an
					// empty IP in CLUSTER SLOTS.
					"--cluster-announce-ip", "127.0.0.1",
				)
			}
			return args, nil
		},
	}, deadline)
	if err != nil {
		return RedisServer{}, nil, err
	}
	if cluster {
		if err := redisClaimAllSlots(p.addr, deadline); err != nil {
			p.stop()
			return RedisServer{}, nil, fmt.Errorf("%w; its output:\n%s", err, p.log)
		}
	}
	return RedisServer{Addr: p.addr, Cluster: cluster}, redisGroup{p}, nil
}

// redisBaseArgs are the settings every data node shares: loopback only, no
// persistence (the data dies with the test binary anyway) and a log of
// warnings only, the part worth showing when a start fails.
func redisBaseArgs(dir string) []string {
	return []string{
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--loglevel", "warning",
	}
}

// redisSpec says how to start one redis-server process.
type redisSpec struct {
	// role names the process in errors, e.g. "cluster node 2".
	role string
	// ports is how many free loopback ports args needs (a cluster node
	// also needs a bus port); the first is the client address. Default 1.
	ports int
	// args returns the command line. It may write files into dir, the
	// process's own directory, removed when the process is stopped.
	args func(dir string, ports []int) ([]string, error)
	// probe tells whether the server at addr serves; nil means PING.
	probe func(addr string) error
}

// startRedisProc launches a server on free loopback ports and waits until
// it answers, at most until deadline. A port is picked by binding :0 and
// releasing it, so another process may grab it before redis-server binds;
// an early exit is therefore retried on new ports.
func startRedisProc(bin string, spec redisSpec, deadline time.Time) (*redisProc, error) {
	n := max(spec.ports, 1)
	var lastErr error
	for range redisStartAttempts {
		ports, err := freePorts(n)
		if err != nil {
			return nil, err
		}
		p, err := launchRedis(bin, spec, ports, deadline)
		if err == nil {
			return p, nil
		}
		lastErr = err
		if !errors.Is(err, errRedisExited) {
			break
		}
	}
	return nil, fmt.Errorf("start %s: %w", spec.role, lastErr)
}

// freePorts returns n distinct free loopback ports: all n listeners are
// open at once, so the kernel cannot hand out one port twice.
func freePorts(n int) ([]int, error) {
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

var errRedisExited = errors.New("redis-server exited during startup")

// redisProc is a running redis-server child process.
type redisProc struct {
	role     string
	addr     string
	dir      string
	cmd      *exec.Cmd
	log      *tailBuffer
	done     chan struct{} // closed when the process has exited
	stopOnce sync.Once
}

func launchRedis(bin string, spec redisSpec, ports []int, deadline time.Time) (*redisProc, error) {
	dir, err := os.MkdirTemp("", "fleetbroker-redis-")
	if err != nil {
		return nil, err
	}
	args, err := spec.args(dir, ports)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("%s: %w", spec.role, err)
	}
	p := &redisProc{
		role: spec.role,
		addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
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
	probe := spec.probe
	if probe == nil {
		probe = redisPing
	}
	if err := p.waitReady(deadline, probe); err != nil {
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

func (p *redisProc) waitReady(deadline time.Time, probe func(addr string) error) error {
	for {
		err := probe(p.addr)
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%w: %s on %s; its output:\n%s", errRedisExited, p.role, p.addr, p.log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s on %s did not answer PING in time: %v; its output:\n%s",
				p.role, p.addr, err, p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func redisPing(addr string) error {
	return redisProbe(func() (net.Conn, error) { return net.DialTimeout("tcp", addr, time.Second) })
}

// redisProbe dials, sends AUTH if auth (user, password) is given, then
// PING. It speaks raw RESP rather than go-redis, whose pool would log every
// refused dial while the server is still starting.
func redisProbe(dial func() (net.Conn, error), auth ...string) error {
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
		if _, err := conn.Write(respCommand(cmd...)); err != nil {
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

// respCommand encodes a command as a RESP array of bulk strings, which,
// unlike an inline command, carries any byte in an argument.
func respCommand(args ...string) []byte {
	b := fmt.Appendf(nil, "*%d\r\n", len(args))
	for _, a := range args {
		b = fmt.Appendf(b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b
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
	return redisWaitFor(deadline, "redis cluster on "+addr+" to reach cluster_state:ok", func(ctx context.Context) error {
		return redisClusterHealthy(ctx, c, 1)
	})
}

// redisClusterHealthy tells whether node sees a healthy cluster of nodes
// nodes covering every slot.
func redisClusterHealthy(ctx context.Context, node *redis.Client, nodes int) error {
	info, err := node.ClusterInfo(ctx).Result()
	if err != nil {
		return err
	}
	for _, want := range []string{
		"cluster_state:ok",
		"cluster_slots_ok:16384",
		"cluster_known_nodes:" + strconv.Itoa(nodes),
	} {
		if !strings.Contains(info, want+"\r\n") {
			return fmt.Errorf("CLUSTER INFO lacks %s:\n%s", want, info)
		}
	}
	return nil
}

// redisWaitFor calls check until it returns nil, and fails with its last
// error once deadline has passed. Each call gets a context that ends at
// the deadline.
func redisWaitFor(deadline time.Time, what string, check func(ctx context.Context) error) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out waiting for %s; last error: %w", what, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// redisGroup is the processes of one deployment.
type redisGroup []*redisProc

// stop stops every process of g at once, so a deployment goes down in one
// stop timeout, not one per process.
func (g redisGroup) stop() {
	var wg sync.WaitGroup
	for _, p := range g {
		wg.Go(p.stop)
	}
	wg.Wait()
}

// logs is the log tail of every process, for a failed start.
func (g redisGroup) logs() string {
	var b strings.Builder
	for _, p := range g {
		fmt.Fprintf(&b, "--- %s on %s ---\n%s", p.role, p.addr, p.log)
	}
	return b.String()
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
