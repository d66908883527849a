package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// RedisCLIBinEnv names the environment variable that overrides the
// redis-cli binary; otherwise redis-cli is taken from beside redis-server,
// then from PATH.
const RedisCLIBinEnv = "FLEETBROKER_REDIS_CLI_BIN"

const (
	// redisClusterMasters is how many masters RedisShardedCluster runs:
	// the fewest redis-cli --cluster create accepts.
	redisClusterMasters = 3
	// redisDeployTimeout bounds the start of a whole deployment: its
	// processes, and the cluster or replication handshakes between them.
	redisDeployTimeout = 30 * time.Second
)

// RedisShardedCluster returns the test binary's Redis Cluster of three
// masters without replicas, its 16384 slots split between them by
// redis-cli --cluster create as in production, starting it on first use
// (about two seconds). Unlike the single node of RedisCluster, keys in
// different slots live in different processes: clients must follow MOVED
// redirections, a script runs on the master owning its keys, and a walk over
// the keyspace has to visit every master. Addrs lists the masters, so
// Options and Client give a *redis.ClusterClient.
func RedisShardedCluster(t testing.TB) RedisDeployment {
	t.Helper()
	return redisShardedCluster.get(t)
}

func startRedisShardedCluster() (d RedisDeployment, g redisGroup, err error) {
	bin, err := launch.RedisBinary()
	if err != nil {
		return RedisDeployment{}, nil, err
	}
	cli, err := redisCLIBinary(bin)
	if err != nil {
		return RedisDeployment{}, nil, err
	}
	deadline := time.Now().Add(redisDeployTimeout)
	defer func() {
		if err != nil {
			err = fmt.Errorf("redis cluster: %w; output of its servers:\n%s", err, g.logs())
			g.Stop()
			g = nil
		}
	}()
	for i := range redisClusterMasters {
		p, err := launch.StartRedis(bin, redisSpec{
			Role:  "cluster node " + strconv.Itoa(i+1),
			Ports: 2,
			Args: func(dir string, ports []int) ([]string, error) {
				return append(launch.RedisBaseArgs(dir),
					"--port", strconv.Itoa(ports[0]),
					"--cluster-enabled", "yes",
					"--cluster-config-file", filepath.Join(dir, "nodes.conf"),
					// The bus port defaults to port+10000, beyond 65535 for
					// much of the ephemeral range free ports come from.
					"--cluster-port", strconv.Itoa(ports[1]),
					"--cluster-announce-ip", "127.0.0.1",
				), nil
			},
		}, deadline)
		if err != nil {
			return RedisDeployment{}, g, err
		}
		g = append(g, p)
		d.Addrs = append(d.Addrs, p.Addr)
	}
	d.Nodes = d.Addrs

	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	// The same command an operator runs: it assigns the slot ranges, gives
	// each node its config epoch and introduces the nodes to each other.
	args := append([]string{"--cluster", "create"}, d.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	// No Pdeathsig: redis-cli finishes within the deadline on its own, and
	// a Pdeathsig tied to this goroutine's thread could kill it early.
	out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
	if err != nil {
		return RedisDeployment{}, g, fmt.Errorf("%s %v: %w; its output:\n%s", cli, args, err, ansiEscape.ReplaceAll(out, nil))
	}

	// redis-cli returns once the nodes agree on the slots; each node still
	// needs a moment to declare the cluster ok. Until every node does, a
	// client may be sent to a node that answers CLUSTERDOWN.
	for _, addr := range d.Addrs {
		node := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
		err := redisWaitFor(deadline, "cluster node "+addr+" to report cluster_state:ok", func(ctx context.Context) error {
			return redisClusterHealthy(ctx, node, redisClusterMasters)
		})
		_ = node.Close()
		if err != nil {
			return RedisDeployment{}, g, err
		}
	}
	return d, g, nil
}

// ansiEscape matches the colour codes redis-cli --cluster writes even when
// its output is not a terminal.
var ansiEscape = regexp.MustCompile(`\x1b\[[0-9;]*m`)

// redisCLIBinary finds redis-cli, preferring the one installed with
// redisServer, so FLEETBROKER_REDIS_BIN pointing at a build directory
// brings its matching redis-cli along.
func redisCLIBinary(redisServer string) (string, error) {
	if bin := os.Getenv(RedisCLIBinEnv); bin != "" {
		if _, err := exec.LookPath(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w", RedisCLIBinEnv, bin, err)
		}
		return bin, nil
	}
	if filepath.IsAbs(redisServer) || filepath.Base(redisServer) != redisServer {
		beside := filepath.Join(filepath.Dir(redisServer), "redis-cli")
		if _, err := exec.LookPath(beside); err == nil {
			return beside, nil
		}
	}
	bin, err := exec.LookPath("redis-cli")
	if err != nil {
		return "", fmt.Errorf("redis-cli not found beside %s, on PATH or in %s (%w); "+
			"install it with: apt-get install -y redis-server", redisServer, RedisCLIBinEnv, err)
	}
	return bin, nil
}
