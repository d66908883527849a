package testenv_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// The three masters split the slots, and keys really spread over them.
func TestRedisShardedCluster(t *testing.T) {
	d := testenv.RedisShardedCluster(t)
	if len(d.Addrs) != 3 || d.MasterName != "" {
		t.Fatalf("deployment %+v, want three addresses and no master name", d)
	}
	client, ok := d.Client(t).(*redis.ClusterClient)
	if !ok {
		t.Fatalf("Client is a %T, want *redis.ClusterClient", d.Client(t))
	}
	ctx := t.Context()
	shards, err := client.ClusterShards(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(shards) != 3 {
		t.Fatalf("CLUSTER SHARDS lists %d shards, want 3", len(shards))
	}
	for _, s := range shards {
		if len(s.Slots) == 0 {
			t.Errorf("shard %+v owns no slots", s)
		}
	}

	prefix := testenv.RedisPrefix(t)
	for i := range 30 {
		if err := client.Set(ctx, fmt.Sprintf("%s:{%d}", prefix, i), i, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if got := mastersHolding(t, client, prefix); got != 3 {
		t.Errorf("keys of 30 hash tags landed on %d masters, want 3", got)
	}
	// The servers enforce slots: a multi-key command across them fails.
	err = client.MSet(ctx, prefix+":{a}", 1, prefix+":{b}", 2).Err()
	if err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Errorf("MSET across slots: %v, want CROSSSLOT", err)
	}
}

// mastersHolding counts the masters holding keys that start with prefix.
func mastersHolding(t *testing.T, c *redis.ClusterClient, prefix string) int {
	t.Helper()
	var mu sync.Mutex
	n := 0
	err := c.ForEachMaster(t.Context(), func(ctx context.Context, node *redis.Client) error {
		keys, _, err := node.Scan(ctx, 0, prefix+":*", 1000).Result()
		if len(keys) > 0 {
			mu.Lock()
			n++
			mu.Unlock()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Writes through the Sentinel client reach the master and its replica.
func TestRedisSentinel(t *testing.T) {
	d := testenv.RedisSentinel(t)
	if len(d.Addrs) != 3 || d.MasterName != testenv.RedisSentinelMasterName || len(d.Nodes) != 2 {
		t.Fatalf("deployment %+v, want three Sentinels, a master name, a master and a replica", d)
	}
	client := d.Client(t)
	ctx := t.Context()
	key := testenv.RedisPrefix(t) + ":k"
	if err := client.Set(ctx, key, "v", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	for i, addr := range d.Nodes {
		node := redis.NewClient(&redis.Options{Addr: addr})
		t.Cleanup(func() { _ = node.Close() })
		info, err := node.Info(ctx, "replication").Result()
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"role:master", "role:slave"}[i]; !strings.Contains(info, want+"\r\n") {
			t.Errorf("node %s: INFO replication lacks %s", addr, want)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			v, err := node.Get(ctx, key).Result()
			if err == nil && v == "v" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %s: GET %s = %q, %v; want v", addr, key, v, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestRedisTLS(t *testing.T) {
	srv := testenv.RedisTLS(t)
	ctx := t.Context()
	who, err := srv.Client(t).ACLWhoAmI(ctx).Result()
	if err != nil || who != srv.Username {
		t.Fatalf("ACL WHOAMI = %q, %v; want %q", who, err, srv.Username)
	}

	try := func(opts *redis.Options) error {
		opts.Addr = srv.Addr
		opts.MaxRetries = -1
		opts.DialerRetries = 1
		opts.DialTimeout = time.Second
		opts.ReadTimeout = time.Second
		c := redis.NewClient(opts)
		defer c.Close()
		return c.Ping(ctx).Err()
	}
	var unknownCA x509.UnknownAuthorityError
	for _, tc := range []struct {
		name  string
		opts  *redis.Options
		check func(error) bool
	}{
		// The server drops a connection whose first bytes are no TLS
		// handshake.
		{"plaintext", &redis.Options{Username: srv.Username, Password: srv.Password}, func(err error) bool {
			return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
		}},
		{"default user", &redis.Options{TLSConfig: srv.TLSConfig(t)}, func(err error) bool {
			return err != nil && strings.Contains(err.Error(), "NOAUTH")
		}},
		{"wrong password", &redis.Options{TLSConfig: srv.TLSConfig(t), Username: srv.Username, Password: "x"}, func(err error) bool {
			return err != nil && strings.Contains(err.Error(), "WRONGPASS")
		}},
		{"untrusted server", &redis.Options{TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12}, Username: srv.Username, Password: srv.Password},
			func(err error) bool { return errors.As(err, &unknownCA) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := try(tc.opts); !tc.check(err) {
				t.Errorf("PING: %v", err)
			}
		})
	}

}
