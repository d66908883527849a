package testenv

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// RedisProcess is a redis-server that belongs to one test, which may
// therefore freeze it (SIGSTOP, the way a stalled VM or a long fork looks to
// clients), thaw it, or point a replica at it. The shared servers of Redis,
// RedisShardedCluster and RedisSentinel must never be treated so.
type RedisProcess struct {
	// Addr is host:port on loopback.
	Addr string
	p    *redisProc
}

// RedisOwn starts a standalone redis-server for t, stopped when t ends. With
// replicaOf (a RedisOwn master's address) it is a replica of that master,
// returned once it is in sync.
func RedisOwn(t testing.TB, replicaOf ...string) *RedisProcess {
	t.Helper()
	bin, err := launch.RedisBinary()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	deadline := time.Now().Add(redisReadyTimeout)
	role := "own redis-server"
	if len(replicaOf) > 0 {
		role = "own replica of " + replicaOf[0]
	}
	p, err := launch.StartRedis(bin, redisSpec{
		Role: role,
		Args: func(dir string, ports []int) ([]string, error) {
			args := append(launch.RedisBaseArgs(dir), "--port", strconv.Itoa(ports[0]), "--repl-diskless-sync-delay", "0")
			if len(replicaOf) > 0 {
				host, port, err := net.SplitHostPort(replicaOf[0])
				if err != nil {
					return nil, err
				}
				args = append(args, "--replicaof", host, port)
			}
			return args, nil
		},
	}, deadline)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	r := &RedisProcess{Addr: p.Addr, p: p}
	t.Cleanup(func() {
		_ = p.Cmd.Process.Signal(syscall.SIGCONT) // a frozen server cannot stop
		p.Stop()
	})
	if len(replicaOf) > 0 {
		// In sync means a write on the master has reached the replica: a
		// master starts streaming to a freshly synced replica only after
		// its first acknowledgement, up to a second after the sync.
		rc := redis.NewClient(&redis.Options{Addr: p.Addr, ContextTimeoutEnabled: true})
		defer rc.Close()
		mc := redis.NewClient(&redis.Options{Addr: replicaOf[0], ContextTimeoutEnabled: true})
		defer mc.Close()
		const probe = "testenv:replica-synced"
		err := redisWaitFor(deadline, "the replica to sync", func(ctx context.Context) error {
			if err := mc.Set(ctx, probe, p.Addr, 0).Err(); err != nil {
				return err
			}
			got, err := rc.Get(ctx, probe).Result()
			if err != nil || got != p.Addr {
				info, _ := rc.Info(ctx, "replication").Result()
				return fmt.Errorf("replica not in sync (%v):\n%s", err, info)
			}
			return mc.Del(ctx, probe).Err()
		})
		if err != nil {
			t.Fatalf("testenv: %v; its output:\n%s", err, p.Log)
		}
	}
	return r
}

// Freeze stops the server process (SIGSTOP): connections stay open and
// commands are accepted by the kernel, but nothing answers until Thaw.
func (r *RedisProcess) Freeze(t testing.TB) {
	t.Helper()
	if err := r.p.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("testenv: freeze %s: %v", r.Addr, err)
	}
}

// Thaw resumes a frozen server (SIGCONT).
func (r *RedisProcess) Thaw(t testing.TB) {
	t.Helper()
	if err := r.p.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatalf("testenv: thaw %s: %v", r.Addr, err)
	}
}

// Client returns a plain client for the server, closed when t ends.
func (r *RedisProcess) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: r.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = c.Close() })
	return c
}
