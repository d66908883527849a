package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

const (
	// RedisSentinelMasterName is the name RedisSentinel's Sentinels monitor
	// the master under.
	RedisSentinelMasterName = "mymaster"
	// redisSentinels and redisSentinelQuorum are the smallest Sentinel
	// setup that survives losing a Sentinel: three, two of which must agree.
	redisSentinels      = 3
	redisSentinelQuorum = 2
)

// RedisSentinel returns the test binary's Sentinel deployment, starting it
// on first use: a master, one replica of it, and three Sentinels
// monitoring the master as RedisSentinelMasterName. Addrs lists the
// Sentinels and MasterName is set, so Options and Client give a
// Sentinel-backed *redis.Client that asks the Sentinels where the master
// is; Nodes are the master and the replica. It is ready once the replica
// has synced and every Sentinel reports the master and knows the replica.
// Tests must not fail the master over: the deployment is shared.
func RedisSentinel(t testing.TB) RedisDeployment {
	t.Helper()
	return redisSentinel.get(t)
}

func startRedisSentinel() (RedisDeployment, redisGroup, error) {
	return startSentinelDeployment(sentinelLayout{replicas: 1})
}

// sentinelLayout shapes a Sentinel deployment.
type sentinelLayout struct {
	// replicas of the master (at least one).
	replicas int
	// downAfter is how long the master must not answer before a Sentinel
	// deems it down; 0 keeps Sentinel's default (30 s). failoverTimeout
	// bounds one failover (0: Sentinel's default, 3 min).
	downAfter, failoverTimeout time.Duration
}

func startSentinelDeployment(layout sentinelLayout) (d RedisDeployment, g redisGroup, err error) {
	bin, err := launch.RedisBinary()
	if err != nil {
		return RedisDeployment{}, nil, err
	}
	deadline := time.Now().Add(redisDeployTimeout)
	defer func() {
		if err != nil {
			err = fmt.Errorf("redis sentinel: %w; output of its servers:\n%s", err, g.logs())
			g.Stop()
			g = nil
		}
	}()
	start := func(spec redisSpec) (*redisProc, error) {
		p, err := launch.StartRedis(bin, spec, deadline)
		if err == nil {
			g = append(g, p)
		}
		return p, err
	}

	master, err := start(redisSpec{
		Role: "master",
		Args: func(dir string, ports []int) ([]string, error) {
			return append(launch.RedisBaseArgs(dir),
				"--port", strconv.Itoa(ports[0]),
				// Sync a replica at once, not after the default 5 s
				// wait for more replicas to share the transfer.
				"--repl-diskless-sync-delay", "0",
			), nil
		},
	})
	if err != nil {
		return RedisDeployment{}, g, err
	}
	masterHost, masterPort, _ := net.SplitHostPort(master.Addr)
	var replicas []string
	for i := range max(layout.replicas, 1) {
		replica, err := start(redisSpec{
			Role: "replica " + strconv.Itoa(i+1),
			Args: func(dir string, ports []int) ([]string, error) {
				return append(launch.RedisBaseArgs(dir),
					"--port", strconv.Itoa(ports[0]),
					"--replicaof", masterHost, masterPort,
					"--repl-diskless-sync-delay", "0", // a replica promoted by a failover syncs the other at once
				), nil
			},
		})
		if err != nil {
			return RedisDeployment{}, g, err
		}
		replicas = append(replicas, replica.Addr)
	}
	for i := range redisSentinels {
		s, err := start(redisSpec{
			Role: "sentinel " + strconv.Itoa(i+1),
			// A Sentinel takes its settings from a file it can rewrite:
			// it records what it learns (replicas, peers, epochs) there.
			Args: func(dir string, ports []int) ([]string, error) {
				conf := filepath.Join(dir, "sentinel.conf")
				text := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %q\nsentinel monitor %s %s %s %d\n",
					ports[0], dir, RedisSentinelMasterName, masterHost, masterPort, redisSentinelQuorum)
				if layout.downAfter > 0 {
					text += fmt.Sprintf("sentinel down-after-milliseconds %s %d\n", RedisSentinelMasterName, layout.downAfter.Milliseconds())
				}
				if layout.failoverTimeout > 0 {
					text += fmt.Sprintf("sentinel failover-timeout %s %d\n", RedisSentinelMasterName, layout.failoverTimeout.Milliseconds())
				}
				if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
					return nil, err
				}
				return []string{conf, "--sentinel"}, nil
			},
		})
		if err != nil {
			return RedisDeployment{}, g, err
		}
		d.Addrs = append(d.Addrs, s.Addr)
	}
	d.MasterName = RedisSentinelMasterName
	d.Nodes = append([]string{master.Addr}, replicas...)

	// A replica still syncing answers reads with an error, and Sentinels
	// learn the replica from the master's INFO a moment after they start.
	for _, replica := range replicas {
		rc := redis.NewClient(&redis.Options{Addr: replica, ContextTimeoutEnabled: true})
		err := redisWaitFor(deadline, "replica "+replica+" to sync", func(ctx context.Context) error {
			info, err := rc.Info(ctx, "replication").Result()
			if err != nil {
				return err
			}
			if !strings.Contains(info, "master_link_status:up\r\n") {
				return fmt.Errorf("replica not in sync:\n%s", info)
			}
			return nil
		})
		_ = rc.Close()
		if err != nil {
			return RedisDeployment{}, g, err
		}
	}
	for _, addr := range d.Addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
		err := redisWaitFor(deadline, "sentinel "+addr+" to know the master and its replicas", func(ctx context.Context) error {
			return redisSentinelReady(ctx, sc, master.Addr, replicas...)
		})
		_ = sc.Close()
		if err != nil {
			return RedisDeployment{}, g, err
		}
	}
	return d, g, nil
}

// redisSentinelReady tells whether the Sentinel reports master as the
// master and lists every one of replicas as a healthy replica of it.
func redisSentinelReady(ctx context.Context, sc *redis.SentinelClient, master string, replicas ...string) error {
	addr, err := sc.GetMasterAddrByName(ctx, RedisSentinelMasterName).Result()
	if err != nil {
		return err
	}
	if len(addr) != 2 || net.JoinHostPort(addr[0], addr[1]) != master {
		return fmt.Errorf("sentinel reports master %v, want %s", addr, master)
	}
	known, err := sc.Replicas(ctx, RedisSentinelMasterName).Result()
	if err != nil {
		return err
	}
	healthy := map[string]bool{}
	for _, r := range known {
		if r["flags"] == "slave" {
			healthy[r["name"]] = true
		}
	}
	for _, replica := range replicas {
		if !healthy[replica] {
			return fmt.Errorf("sentinel lists replicas %v, want %s with flags slave", known, replica)
		}
	}
	return nil
}
