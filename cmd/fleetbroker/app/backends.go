package app

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// RedisConfig selects single node, Sentinel or Cluster through go-redis's
// UniversalClient: a master name means Sentinel, several addresses Cluster.
type RedisConfig struct {
	Addrs      []string
	MasterName string
	// Username and Password log in as an ACL user; Password alone logs in
	// as the default user (requirepass). With Sentinel they apply to the
	// master and replicas, not to the Sentinels.
	Username string
	Password string
	// TLS speaks TLS 1.2 or later to every address: each Cluster node, or
	// the Sentinels and the master they name. The server certificate is
	// verified, against TLSCAFile or else the system roots, for
	// TLSServerName or else the host of the address dialled.
	TLS bool
	// TLSCAFile holds the PEM CA certificates trusted to sign the server
	// certificates; empty means the system roots.
	TLSCAFile string
	// TLSCertFile and TLSKeyFile are a PEM client certificate and key, for
	// servers that check clients (tls-auth-clients). They are read once,
	// at NewRedis: a rotated client certificate takes a restart.
	TLSCertFile string
	TLSKeyFile  string
	// TLSServerName is the name the server certificates must carry, when
	// it is not the host in the address, e.g. with addresses given as IPs.
	// In a Cluster every node is checked against it, so it suits only a
	// certificate shared by all nodes.
	TLSServerName string
	// Timeout bounds every Redis call as a whole: waiting for a pooled
	// connection, dialing, writing and reading (see NewRedis).
	Timeout time.Duration
}

// tlsConfig returns the client TLS configuration cfg asks for, or nil for
// plaintext.
func (cfg RedisConfig) tlsConfig() (*tls.Config, error) {
	if !cfg.TLS {
		return nil, nil
	}
	tc, err := tlsutil.StaticClientConfig(tlsutil.Files{CAFile: cfg.TLSCAFile, CertFile: cfg.TLSCertFile, KeyFile: cfg.TLSKeyFile},
		cfg.TLSServerName, tls.VersionTLS12)
	if err != nil {
		return nil, fmt.Errorf("redis: TLS %w", err)
	}
	return tc, nil
}

// NewRedis returns a connected client, or an error if PING fails.
//
// Every call is bounded by cfg.Timeout as a whole — the wait for a pooled
// connection, the dial (Sentinel's master lookup included), the write and
// the read — so a frozen Redis answers within about that time, not after
// it thaws. go-redis does not retry: a retried write whose first reply was
// lost is a second write (the store's scripts are idempotent under retry,
// but other callers' commands, such as rate-limit counters, are not), and
// each retry would stretch a call past its bound. Callers retry, with the
// request id that makes a repeat harmless.
func NewRedis(ctx context.Context, cfg RedisConfig) (redis.UniversalClient, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	tlsConfig, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	timeout := cmp.Or(max(cfg.Timeout, 0), DefaultRedisTimeout)
	client := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:        cfg.Addrs,
		MasterName:   cfg.MasterName,
		Username:     cfg.Username,
		Password:     cfg.Password,
		TLSConfig:    tlsConfig,
		DialTimeout:  timeout,
		ReadTimeout:  timeout,
		WriteTimeout: timeout,
		PoolTimeout:  timeout,
		MaxRetries:   -1, // no retries: see above
		// One dial per attempt: dial retries with backoff would outlast
		// the timeout; the bound below cuts them off anyway.
		DialerRetries: 1,
		// Without this go-redis ignores the caller's deadline for socket I/O.
		ContextTimeoutEnabled: true,
	})
	bound := deadlineHook{timeout: timeout}
	client.AddHook(bound)
	if cc, ok := client.(*redis.ClusterClient); ok {
		// A cluster's node clients run calls of their own (the store's
		// WAIT path uses them directly): bound those too.
		cc.OnNewNode(func(node *redis.Client) { node.AddHook(bound) })
	}
	pingCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := client.Ping(pingCtx).Err(); err != nil {
		client.Close()
		return nil, fmt.Errorf("redis: ping %v: %w", cfg.Addrs, err)
	}
	return client, nil
}

// deadlineHook gives every command and pipeline a deadline of timeout from
// its start, unless the caller's is sooner. Because go-redis waits for a
// pooled connection, dials and does its socket I/O under the call's
// context (ContextTimeoutEnabled), this bounds the whole call.
type deadlineHook struct{ timeout time.Duration }

func (h deadlineHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h deadlineHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		ctx, cancel := context.WithTimeout(ctx, h.timeout)
		defer cancel()
		return next(ctx, cmd)
	}
}

func (h deadlineHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		ctx, cancel := context.WithTimeout(ctx, h.timeout)
		defer cancel()
		return next(ctx, cmds)
	}
}

// RedisWaitAuto, as RedisWaitReplicas, waits for one replica where the
// topology has replicas and for none where it has none.
const RedisWaitAuto = -1

// redisWaitReplicas decides how many replicas must acknowledge credential
// writes: want, or with RedisWaitAuto one if the topology has any. It logs
// the decision, since without replicas a failover (or a lost node) loses
// acknowledged writes.
func redisWaitReplicas(ctx context.Context, rdb redis.UniversalClient, want int, logger *slog.Logger) (int, error) {
	if want >= 0 {
		logger.Info("credential writes wait for Redis replicas", "replicas", want)
		return want, nil
	}
	n, err := store.CountReplicas(ctx, rdb)
	if err != nil {
		return 0, fmt.Errorf("redis: count the replicas for --redis-wait-replicas=-1 (INFO replication; an ACL without @dangerous refuses it: "+
			"allow +info, or set --redis-wait-replicas to 0 or 1): %w", err)
	}
	if n == 0 {
		logger.Warn("Redis has no replica: credential writes are acknowledged once on the master; " +
			"without AOF (appendfsync always) a crash or failover can lose them")
		return 0, nil
	}
	logger.Info("credential writes wait for one Redis replica (WAIT)", "replicas_seen", n)
	return 1, nil
}

// VaultConfig is how a service reaches Vault transit.
type VaultConfig = transit.VaultConfig

// NewVault connects to Vault transit; the caller must Close it.
func NewVault(ctx context.Context, cfg VaultConfig, logger *slog.Logger) (*transit.Vault, error) {
	if err := validateVault(cfg); err != nil {
		return nil, err
	}
	v, err := transit.NewVault(ctx, cfg, logger)
	if err != nil {
		return nil, fmt.Errorf("vault: %w", err)
	}
	return v, nil
}

// newProviders builds a process's provider registry from d.Providers (nil:
// every provider fleetbroker serves) on the one HTTP client shape for
// provider calls: a timeout on every request, latency/status metrics by
// provider and endpoint in d.Metrics (nil: not measured), and
// d.UpstreamTransport, else a transport that dials only addresses the
// allow-list permits (checked on the address actually dialed, so DNS cannot
// aim it at internal services). The providers share one transport, and so
// its connection pool. Egress proxies are not supported: through one, the
// address check would see the proxy, not the upstream.
//
// rdb, if set, is where the providers keep what every replica of the
// service shares (the credentials service's login budgets and refused
// secrets), under prefix.
func newProviders(d Deps, timeout time.Duration, allow *upstream.AllowList, tuning provider.Tuning, rdb redis.UniversalClient, prefix string) (*provider.Registry, error) {
	factories := d.Providers
	if factories == nil {
		factories = providers.All()
	}
	base := d.UpstreamTransport
	if base == nil {
		base = upstream.NewTransport(allow)
	}
	env := provider.Env{
		HTTPClient: func(name string) *http.Client {
			return &http.Client{Timeout: timeout, Transport: telemetry.InstrumentTransport(base, name, d.Metrics)}
		},
		Tuning:      tuning,
		Logger:      d.logger(),
		Redis:       rdb,
		RedisPrefix: prefix,
	}
	reg, err := provider.NewRegistry(env, factories...)
	if err != nil {
		return nil, fmt.Errorf("providers: %w", err)
	}
	return reg, nil
}
