package testenv

import (
	"net"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
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
	bin, err := launch.RedisBinary()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	r := &RestartableRedis{bin: bin, dir: t.TempDir()}
	for attempt := 1; ; attempt++ {
		ports, err := launch.FreePorts(1)
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
			r.proc.Stop()
		}
	})
	return r
}

func (r *RestartableRedis) start() error {
	// Dir stays empty: Stop must not remove the data directory.
	p, err := launch.NewRedisProc("restartable redis-server", r.Addr, "", exec.Command(r.bin,
		"--bind", "127.0.0.1", "--port", strconv.Itoa(r.port), "--dir", r.dir,
		"--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
		"--loglevel", "warning"))
	if err != nil {
		return err
	}
	if err := p.WaitReady(time.Now().Add(redisReadyTimeout), launch.RedisPing); err != nil {
		p.Stop()
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
	_ = p.Cmd.Process.Kill()
	<-p.Done
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
