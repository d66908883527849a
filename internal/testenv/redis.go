package testenv

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// RedisBinEnv names the environment variable that overrides the redis-server
// binary; otherwise redis-server is looked up on PATH.
const RedisBinEnv = launch.RedisBinEnv

const (
	redisStartAttempts = 5
	redisReadyTimeout  = 15 * time.Second
)

// The processes and their specs are internal/testenv/launch's, shared with
// the benchmark.
type (
	redisProc = launch.RedisProc
	redisSpec = launch.RedisSpec
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
// without it the servers still die with the binary (see launch.Fork).
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
		s.procs.Stop()
		s.procs, s.err = nil, errors.New("redis already stopped by StopRedis")
	}
}

// startRedisServer starts the standalone server or, with cluster, the
// single-node cluster.
func startRedisServer(cluster bool) (RedisServer, redisGroup, error) {
	bin, err := launch.RedisBinary()
	if err != nil {
		return RedisServer{}, nil, err
	}
	deadline := time.Now().Add(redisReadyTimeout)
	p, err := launch.StartRedis(bin, redisSpec{
		Role: "redis-server",
		Args: func(dir string, ports []int) ([]string, error) {
			args := append(launch.RedisBaseArgs(dir), "--port", strconv.Itoa(ports[0]))
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
		if err := redisClaimAllSlots(p.Addr, deadline); err != nil {
			p.Stop()
			return RedisServer{}, nil, fmt.Errorf("%w; its output:\n%s", err, p.Log)
		}
	}
	return RedisServer{Addr: p.Addr, Cluster: cluster}, redisGroup{p}, nil
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

// Stop stops every process of g at once, so a deployment goes down in one
// stop timeout, not one per process.
func (g redisGroup) Stop() {
	var wg sync.WaitGroup
	for _, p := range g {
		wg.Go(p.Stop)
	}
	wg.Wait()
}

// logs is the log tail of every process, for a failed start.
func (g redisGroup) logs() string {
	var b strings.Builder
	for _, p := range g {
		fmt.Fprintf(&b, "--- %s on %s ---\n%s", p.Role, p.Addr, p.Log)
	}
	return b.String()
}
