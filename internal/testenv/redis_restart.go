package testenv

import (
	"net"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// RestartableRedis is a redis-server of one test that the test can crash
// and start again on the same address and data directory, for fault tests.
// It persists like production (AOF, appendfsync everysec), so what it
// acknowledged before a crash is there after the restart.
type RestartableRedis struct {
	// Addr is host:port on loopback; it stays the same across restarts.
	Addr string

	bin, dir string
	port     int

	mu   sync.Mutex
	proc *redisProc // nil while stopped
}

// RedisRestartable starts a redis-server for t, stopped when t ends.
func RedisRestartable(t testing.TB) *RestartableRedis {
	t.Helper()
	bin, err := redisBinary()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	r := &RestartableRedis{bin: bin, dir: t.TempDir()}
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(1)
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		r.port = ports[0]
		r.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port))
		err = r.start()
		if err == nil {
			break
		}
		if attempt == redisStartAttempts { // the port may be taken between probe and bind
			t.Fatalf("testenv: %v", err)
		}
	}
	t.Cleanup(func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.proc != nil {
			r.proc.stop()
		}
	})
	return r
}

func (r *RestartableRedis) start() error {
	p := &redisProc{
		role: "restartable redis-server",
		addr: r.Addr,
		// dir stays empty: stop must not remove the data directory.
		log:  &tailBuffer{max: redisLogTail},
		done: make(chan struct{}),
	}
	p.cmd = exec.Command(r.bin,
		"--bind", "127.0.0.1", "--port", strconv.Itoa(r.port), "--dir", r.dir,
		"--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
		"--loglevel", "warning")
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.start(); err != nil {
		return err
	}
	if err := p.waitReady(time.Now().Add(redisReadyTimeout), redisPing); err != nil {
		p.stop()
		return err
	}
	r.mu.Lock()
	r.proc = p
	r.mu.Unlock()
	return nil
}

// Kill crashes the server (SIGKILL). Clients get connection refused until
// Start.
func (r *RestartableRedis) Kill(t testing.TB) {
	t.Helper()
	r.mu.Lock()
	p := r.proc
	r.proc = nil
	r.mu.Unlock()
	if p == nil {
		t.Fatal("testenv: redis is not running")
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Start starts the killed server again on the same address and data.
func (r *RestartableRedis) Start(t testing.TB) {
	t.Helper()
	if err := r.start(); err != nil {
		t.Fatalf("testenv: restart redis: %v", err)
	}
}

// Client returns a client for the server, closed when t ends.
func (r *RestartableRedis) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = c.Close() })
	return c
}
