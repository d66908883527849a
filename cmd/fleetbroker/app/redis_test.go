package app_test

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// TestNewRedisTLSACL connects to a TLS-only server that admits one ACL
// user, with every setting right and with each one wrong.
func TestNewRedisTLSACL(t *testing.T) {
	srv := testenv.RedisTLS(t)
	clientCert, clientKey := srv.PKI.Issue(t, "fleetbroker", testenv.IssueOptions{Client: true})
	foreignCert, foreignKey := testenv.NewPKI(t).Issue(t, "intruder", testenv.IssueOptions{Client: true})
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := app.RedisConfig{
		Addrs:     []string{srv.Addr},
		Username:  srv.Username,
		Password:  srv.Password,
		TLS:       true,
		TLSCAFile: srv.PKI.CAFile(),
		Timeout:   2 * time.Second,
	}

	for _, tc := range []struct {
		name string
		edit func(*app.RedisConfig)
	}{
		{"user password and CA", func(*app.RedisConfig) {}},
		// The server checks a certificate that is presented, so this
		// passes only if the right one is sent (see the intruder below).
		{"client certificate", func(c *app.RedisConfig) { c.TLSCertFile, c.TLSKeyFile = clientCert, clientKey }},
		{"server name", func(c *app.RedisConfig) { c.TLSServerName = "localhost" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			client, err := app.NewRedis(t.Context(), cfg)
			if err != nil {
				t.Fatalf("NewRedis: %v", err)
			}
			t.Cleanup(func() { _ = client.Close() })
			if who, err := client.ACLWhoAmI(t.Context()).Result(); err != nil || who != srv.Username {
				t.Errorf("ACL WHOAMI = %q, %v; want %q", who, err, srv.Username)
			}
		})
	}

	// Each failure must be the expected one, not, say, a timeout.
	contains := func(s string) func(error) bool {
		return func(err error) bool { return strings.Contains(err.Error(), s) }
	}
	as := func(target any) func(error) bool {
		return func(err error) bool { return errors.As(err, target) }
	}
	var (
		unknownCA    x509.UnknownAuthorityError
		wrongName    x509.HostnameError
		wrongPass    = contains("WRONGPASS")
		badTLSConfig = contains("--redis-tls")
		// The server drops a connection that starts without a handshake.
		connDropped = func(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) }
	)
	for _, tc := range []struct {
		name string
		edit func(*app.RedisConfig)
		want func(error) bool // recognizes the expected failure
	}{
		{"wrong password", func(c *app.RedisConfig) { c.Password = "wrong" }, wrongPass},
		// The default user is disabled, whatever the password.
		{"default user", func(c *app.RedisConfig) { c.Username = "" }, wrongPass},
		{"without the CA", func(c *app.RedisConfig) { c.TLSCAFile = "" }, as(&unknownCA)},
		{"wrong server name", func(c *app.RedisConfig) { c.TLSServerName = "redis.example" }, as(&wrongName)},
		// In TLS 1.3 the client learns of its rejected certificate only
		// from the server's alert on the first read.
		{"client certificate of another CA", func(c *app.RedisConfig) { c.TLSCertFile, c.TLSKeyFile = foreignCert, foreignKey },
			contains("tls: unknown certificate authority")},
		{"plaintext", func(c *app.RedisConfig) { c.TLS, c.TLSCAFile = false, "" }, connDropped},
		{"CA without TLS", func(c *app.RedisConfig) { c.TLS = false }, badTLSConfig},
		{"server name without TLS", func(c *app.RedisConfig) { c.TLS, c.TLSCAFile, c.TLSServerName = false, "", "localhost" }, badTLSConfig},
		{"certificate without key", func(c *app.RedisConfig) { c.TLSCertFile = clientCert }, contains("both")},
		{"missing CA file", func(c *app.RedisConfig) { c.TLSCAFile = filepath.Join(t.TempDir(), "none.pem") }, as(new(*os.PathError))},
		{"CA file without certificates", func(c *app.RedisConfig) { c.TLSCAFile = notPEM }, contains("no PEM certificate")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each waits out go-redis's dial retries
			cfg := good
			tc.edit(&cfg)
			client, err := app.NewRedis(t.Context(), cfg)
			if err == nil {
				_ = client.Close()
				t.Fatal("NewRedis succeeded, want an error")
			}
			if !tc.want(err) {
				t.Errorf("NewRedis failed for the wrong reason: %v", err)
			}
			if strings.Contains(err.Error(), srv.Password) {
				t.Errorf("error %q carries the password", err)
			}
		})
	}
}

// Several addresses make NewRedis a Cluster client that reaches every
// master of a three-master cluster.
func TestNewRedisCluster(t *testing.T) {
	d := testenv.RedisShardedCluster(t)
	client, err := app.NewRedis(t.Context(), app.RedisConfig{Addrs: d.Addrs})
	if err != nil {
		t.Fatalf("NewRedis: %v", err)
	}
	t.Cleanup(func() { _ = client.Close() })
	cc, ok := client.(*redis.ClusterClient)
	if !ok {
		t.Fatalf("NewRedis returned a %T, want *redis.ClusterClient", client)
	}
	var mu sync.Mutex
	masters := map[string]bool{}
	if err := cc.ForEachMaster(t.Context(), func(ctx context.Context, node *redis.Client) error {
		mu.Lock()
		defer mu.Unlock()
		masters[node.Options().Addr] = true
		return node.Ping(ctx).Err()
	}); err != nil {
		t.Fatal(err)
	}
	if got, want := slices.Sorted(maps.Keys(masters)), slices.Sorted(slices.Values(d.Nodes)); !slices.Equal(got, want) {
		t.Errorf("masters %v, want %v", got, want)
	}
}

// A master name makes NewRedis ask the Sentinels for the master, and
// write there.
func TestNewRedisSentinel(t *testing.T) {
	d := testenv.RedisSentinel(t)
	client, err := app.NewRedis(t.Context(), app.RedisConfig{Addrs: d.Addrs, MasterName: d.MasterName})
	if err != nil {
		t.Fatalf("NewRedis: %v", err)
	}
	t.Cleanup(func() { _ = client.Close() })
	key := testenv.RedisPrefix(t) + ":k"
	if err := client.Set(t.Context(), key, "v", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	master := redis.NewClient(&redis.Options{Addr: d.Nodes[0]})
	t.Cleanup(func() { _ = master.Close() })
	if v, err := master.Get(t.Context(), key).Result(); err != nil || v != "v" {
		t.Errorf("GET %s on the master = %q, %v; want v", key, v, err)
	}

	t.Run("unknown master name", func(t *testing.T) {
		client, err := app.NewRedis(t.Context(), app.RedisConfig{Addrs: d.Addrs, MasterName: "nosuchmaster", Timeout: time.Second})
		if err == nil {
			_ = client.Close()
			t.Fatal("NewRedis succeeded, want an error")
		}
		if !strings.Contains(err.Error(), "sentinels") {
			t.Errorf("NewRedis failed for the wrong reason: %v", err)
		}
	})
}
