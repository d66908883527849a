package testenv

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Failover timings of RedisSentinelFailover: a Sentinel deems the master
// down after failoverDownAfter without an answer, so a failover completes
// within a few seconds instead of Sentinel's default 30 s and more. One
// second is too short on a busy machine: a Sentinel that has just switched
// to the new master and not yet heard from it within that second deems it
// down too and fails over a second time.
const (
	failoverDownAfter = 3 * time.Second
	failoverTimeout   = 10 * time.Second
)

// FailoverSentinel is a Sentinel deployment of one test — a master, two
// replicas and three Sentinels — that the test may fail over. Two replicas,
// as production runs Sentinel: after a failover the new master still has a
// replica, so writes that wait for one (WAIT) keep working.
type FailoverSentinel struct {
	// RedisDeployment gives the Sentinels (Addrs), the master name and the
	// data nodes as started (Nodes: the first master, then the replicas).
	RedisDeployment

	mu    sync.Mutex
	procs map[string]*redisProc // the running nodes, by address
}

// RedisSentinelFailover starts a Sentinel deployment for t, stopped when t
// ends, whose Sentinels declare the master down after three seconds.
func RedisSentinelFailover(t testing.TB) *FailoverSentinel {
	t.Helper()
	d, g, err := startSentinelDeployment(sentinelLayout{replicas: 2, downAfter: failoverDownAfter, failoverTimeout: failoverTimeout})
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(g.Stop)
	s := &FailoverSentinel{RedisDeployment: d, procs: map[string]*redisProc{}}
	for _, p := range g {
		s.procs[p.Addr] = p
	}
	return s
}

// Master is the master the Sentinels report now (asking each in turn until
// one answers).
func (s *FailoverSentinel) Master(t testing.TB) string {
	t.Helper()
	var lastErr error
	for _, addr := range s.Addrs {
		m, err := s.masterBy(t.Context(), addr)
		if err == nil {
			return m
		}
		lastErr = err
	}
	t.Fatalf("testenv: no Sentinel reports the master: %v", lastErr)
	return ""
}

func (s *FailoverSentinel) masterBy(ctx context.Context, sentinel string) (string, error) {
	sc := redis.NewSentinelClient(&redis.Options{Addr: sentinel, ContextTimeoutEnabled: true, DialTimeout: time.Second, MaxRetries: -1})
	defer sc.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addr, err := sc.GetMasterAddrByName(ctx, s.MasterName).Result()
	if err != nil {
		return "", err
	}
	if len(addr) != 2 {
		return "", fmt.Errorf("sentinel %s reports master %v", sentinel, addr)
	}
	return net.JoinHostPort(addr[0], addr[1]), nil
}

// KillMaster crashes the current master (SIGKILL) and returns its address.
// The Sentinels notice within failoverDownAfter and promote a replica.
func (s *FailoverSentinel) KillMaster(t testing.TB) string {
	t.Helper()
	master := s.Master(t)
	s.mu.Lock()
	p := s.procs[master]
	delete(s.procs, master)
	s.mu.Unlock()
	if p == nil {
		t.Fatalf("testenv: master %s is not a running node of this deployment", master)
	}
	_ = p.Cmd.Process.Kill()
	<-p.Done
	return master
}

// WaitFailover waits until every Sentinel reports a master other than old,
// the same one, and that master has a replica in sync with it; it returns
// the new master and when the last Sentinel switched to it.
func (s *FailoverSentinel) WaitFailover(t testing.TB, old string, timeout time.Duration) (string, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var switched time.Time
	for {
		master, err := s.agreedMaster(t.Context())
		if err == nil && master != old {
			if switched.IsZero() {
				switched = time.Now()
			}
			if err = s.hasSyncedReplica(t.Context(), master); err == nil {
				return master, switched
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: no failover from %s within %s: %v", old, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// agreedMaster is the master every Sentinel reports, or an error when they
// differ or one does not answer.
func (s *FailoverSentinel) agreedMaster(ctx context.Context) (string, error) {
	var agreed string
	for _, addr := range s.Addrs {
		m, err := s.masterBy(ctx, addr)
		if err != nil {
			return "", err
		}
		if agreed != "" && m != agreed {
			return "", fmt.Errorf("sentinels disagree: %s and %s", agreed, m)
		}
		agreed = m
	}
	return agreed, nil
}

// hasSyncedReplica tells whether master is a master with at least one
// replica whose link is up.
func (s *FailoverSentinel) hasSyncedReplica(ctx context.Context, master string) error {
	c := redis.NewClient(&redis.Options{Addr: master, ContextTimeoutEnabled: true, DialTimeout: time.Second, MaxRetries: -1})
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	info, err := c.Info(ctx, "replication").Result()
	if err != nil {
		return err
	}
	if !strings.Contains(info, "role:master\r\n") || !strings.Contains(info, "state=online") {
		return fmt.Errorf("%s has no replica online yet:\n%s", master, info)
	}
	return nil
}

// Describe reports each running node's replication state and each
// Sentinel's view of the master, to explain a failed test.
func (s *FailoverSentinel) Describe(ctx context.Context) string {
	var b strings.Builder
	s.mu.Lock()
	nodes := make([]string, 0, len(s.procs))
	logs := map[string]string{}
	for addr, p := range s.procs {
		nodes = append(nodes, addr)
		logs[addr] = p.Role + ":\n" + p.Log.String()
	}
	s.mu.Unlock()
	for _, addr := range nodes {
		fmt.Fprintf(&b, "--- log of %s, %s\n", addr, logs[addr])
	}
	for _, addr := range nodes {
		c := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true, DialTimeout: time.Second, MaxRetries: -1})
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		info, err := c.Info(cctx, "replication").Result()
		cancel()
		_ = c.Close()
		fmt.Fprintf(&b, "--- %s: %v\n%s\n", addr, err, info)
	}
	for _, addr := range s.Addrs {
		m, err := s.masterBy(ctx, addr)
		fmt.Fprintf(&b, "--- sentinel %s: master %s %v\n", addr, m, err)
	}
	return b.String()
}
