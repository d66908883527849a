// Package app composes fleetbroker's subcommands from the service packages:
// it builds each dependency in a visible order, wraps every error with what
// failed, and hands the registered services to the one server bootstrap in
// internal/server. cmd/fleetbroker only parses flags and calls in here.
package app

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// CredentialsConfig configures `fleetbroker credentials`.
type CredentialsConfig struct {
	Server           server.Config
	Security         SecurityConfig
	Vault            VaultConfig
	Redis            RedisConfig
	RedisPrefix      string
	AllowedUpstreams string
	MaxSessionTTL    time.Duration
	// UpstreamTimeout bounds each validation or login call to a provider.
	UpstreamTimeout time.Duration
	// LegacyResolveSecret keeps the retired ResolveSecret answering during
	// a rolling upgrade (--legacy-resolve-secret; off by default).
	LegacyResolveSecret bool
	// Providers are the providers served; nil means every one
	// (providers.All). Tests add a fake here.
	Providers []provider.Factory
	// HandleKeyFile holds the keys that sign and check session handles
	// (shared with the gateway); HandleKeys, when set, are used instead
	// (tests, dev).
	HandleKeyFile string
	HandleKeys    *handle.Keys
	// LegacyHandles is the window in which handles with the CRC32
	// checksum of earlier releases are accepted (set by BuildCredentials;
	// nil refuses them).
	LegacyHandles *handle.LegacyWindow
	// WriteLegacyFormats writes what the previous release reads (CRC32
	// handles, version 1 associated data): the first phase of an upgrade.
	WriteLegacyFormats bool
	// RefuseLegacyAssociatedData stops opening secrets sealed with version
	// 1 associated data (after fleetbroker migrate).
	RefuseLegacyAssociatedData bool
	// RedisWaitReplicas is how many replicas must acknowledge a
	// credential write; RedisWaitAuto picks one where the topology has
	// replicas. 0 does not wait.
	RedisWaitReplicas int
	// TransitBatch shapes the batching of concurrent Vault transit calls
	// (encrypt, decrypt, hmac) into shared batch calls; the zero value is
	// transit's defaults, and MaxItems 1 turns batching off.
	TransitBatch transit.BatchOptions
	// Authorizer is set by RunCredentials from Security; when nil (tests,
	// dev) every caller may do everything.
	Authorizer credentials.Authorizer
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
	// Metrics records the service's metrics (set by RunCredentials; nil: none).
	Metrics *telemetry.Metrics
	// WialonLoginLimit and WialonFailedLoginLimit are the successful and
	// failed Wialon logins a minute every replica of the egress group
	// WialonEgressGroup may make together (0: Wialon's 120 and 10);
	// WialonRefusedTokenTTL is how long a token Wialon refused is refused
	// without asking (0: 1 h).
	WialonLoginLimit       int
	WialonFailedLoginLimit int
	WialonEgressGroup      string
	WialonRefusedTokenTTL  time.Duration
	// WialonKeepAlive is how often at least each stored Wialon token is
	// logged in with (0: 30 days); KeepAliveSweep how often one replica
	// looks for tokens due (0: 1 h; negative: no sweeps).
	WialonKeepAlive time.Duration
	KeepAliveSweep  time.Duration
	// Authorize is the Wialon authorization flow and its callback listener;
	// Events the credential events and checks.
	Authorize AuthorizeConfig
	Events    EventsConfig
	// RedisClient holds the flow's states and the events, and Audit records
	// the flow's callbacks; BuildCredentials sets both (a nil RedisClient
	// turns the flow and the events off).
	RedisClient redis.UniversalClient
	Audit       *audit.Logger
}

// tuning is what the credentials service's flags tell the providers.
func (cfg CredentialsConfig) tuning() (provider.Tuning, error) {
	t := provider.Tuning{
		LoginLimits: provider.LoginLimits{Succeeded: cfg.WialonLoginLimit, Failed: cfg.WialonFailedLoginLimit,
			EgressGroup: cfg.WialonEgressGroup, RefusedTTL: cfg.WialonRefusedTokenTTL},
		KeepAlive: cfg.WialonKeepAlive,
	}
	if cfg.WialonLoginLimit < 0 || cfg.WialonFailedLoginLimit < 0 || cfg.WialonRefusedTokenTTL < 0 || cfg.WialonKeepAlive < 0 {
		return t, fmt.Errorf("--wialon-login-limit, --wialon-failed-login-limit, --wialon-refused-token-ttl and --wialon-keepalive must not be negative")
	}
	if cfg.WialonKeepAlive >= 100*24*time.Hour {
		return t, fmt.Errorf("--wialon-keepalive must be well under 100 days: Wialon deletes a token unused for 100 days")
	}
	if cfg.WialonEgressGroup != "" {
		if err := wialon.CheckEgressGroup(cfg.WialonEgressGroup); err != nil {
			return t, fmt.Errorf("--wialon-egress-group: %w", err)
		}
	}
	return t, nil
}

// RunCredentials serves the credentials service until ctx is done.
func RunCredentials(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) error {
	var built *CredentialsServers
	return runServer(ctx, "fleetbroker-credentials", cfg.MetricsListen, logger, func(m *telemetry.Metrics) (*server.Server, func(), error) {
		cfg.Metrics = m
		b, closeAll, err := BuildCredentialsServers(ctx, cfg, logger)
		if err != nil {
			return nil, nil, err
		}
		built = b
		return b.GRPC, closeAll, nil
	}, func(ctx context.Context) error { return built.ServeBeside(ctx) })
}

// BuildCredentials builds the credentials service's gRPC server and
// everything under it (see BuildCredentialsServers), for callers that serve
// only the gRPC port: --check-config.
func BuildCredentials(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) (*server.Server, func(), error) {
	b, closeAll, err := BuildCredentialsServers(ctx, cfg, logger)
	if err != nil {
		return nil, nil, err
	}
	return b.GRPC, closeAll, nil
}

// BuildCredentialsServers builds what the credentials service serves and
// everything under it, in order: handle keys, Vault, Redis, security (TLS,
// policy, audit), the store, the service, its gRPC server and its
// authorization callback listener. The returned func releases them after serving.
func BuildCredentialsServers(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) (*CredentialsServers, func(), error) {
	var closers closeStack
	fail := func(err error) (*CredentialsServers, func(), error) {
		closers.closeAll()
		return nil, nil, err
	}
	keys, err := loadHandleKeys(cfg.HandleKeys, cfg.HandleKeyFile)
	if err != nil {
		return fail(err)
	}
	cfg.HandleKeys = keys
	vault, rdb, err := openBackends(ctx, cfg.Vault, cfg.Redis, cfg.Metrics, logger, &closers)
	if err != nil {
		return fail(err)
	}
	srvCfg := observed(cfg.Server, cfg.Metrics, redisReady(rdb), vaultReady(vault))
	sec, srvCfg, err := buildSecurity(cfg.Security, srvCfg, authz.Rules(credentials.Actions, nil), nil, true, nil, rdb, cfg.RedisPrefix, logger)
	if err != nil {
		return fail(err)
	}
	closers.push(sec.Close)
	cfg.Authorizer = sec.authorizer
	cfg.RedisClient, cfg.Audit = rdb, sec.audit
	st, err := credentialStore(ctx, cfg, rdb, logger)
	if err != nil {
		return fail(err)
	}
	tr, err := batchedTransit(vault, cfg.TransitBatch)
	if err != nil {
		return fail(err)
	}
	cfg.LegacyHandles = handle.NewLegacyWindow(rdb, cmp.Or(cfg.RedisPrefix, "fb"))
	if cfg.WriteLegacyFormats {
		logger.Warn("issuing legacy session handles and sealing with version 1 associated data (--write-legacy-formats): turn it off once every replica runs this release")
	}
	svc, err := NewCredentialsService(cfg, st, tr, logger)
	if err != nil {
		return fail(err)
	}
	closers.push(startKeepAlive(svc, cfg.KeepAliveSweep))
	srvCfg.Logger = logger
	srv, err := server.New(srvCfg, svc.Register)
	if err != nil {
		return fail(err)
	}
	sec.checkRules(srv, logger)
	authorize, err := buildAuthorizeServer(cfg, svc, logger, &closers)
	if err != nil {
		return fail(err)
	}
	return &CredentialsServers{GRPC: srv, Service: svc, Authorize: authorize}, closers.closeAll, nil
}

// startKeepAlive runs the keep-alive sweeps of svc every interval (0: the
// default; negative: none) until the returned stop is called.
func startKeepAlive(svc *credentials.Service, interval time.Duration) func() {
	if interval < 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		svc.RunKeepAlive(ctx, interval)
	}()
	return func() { cancel(); <-done }
}

// loadHandleKeys returns keys if set, else the keys in file.
func loadHandleKeys(keys *handle.Keys, file string) (*handle.Keys, error) {
	if keys != nil {
		return keys, nil
	}
	if file == "" {
		return nil, fmt.Errorf("--handle-key-file is required: the keys that sign session handles, shared by the credentials service and the gateway " +
			"(one base64 key of 32 random bytes per line; make one with: head -c 32 /dev/urandom | base64)")
	}
	k, err := handle.LoadKeys(file)
	if err != nil {
		return nil, fmt.Errorf("--handle-key-file: %w", err)
	}
	return k, nil
}

// credentialStore is the Redis store of the credentials service, its
// writes waiting for as many replicas as cfg asks.
func credentialStore(ctx context.Context, cfg CredentialsConfig, rdb redis.UniversalClient, logger *slog.Logger) (*store.Redis, error) {
	wait, err := redisWaitReplicas(ctx, rdb, cfg.RedisWaitReplicas, logger)
	if err != nil {
		return nil, err
	}
	timeout := cfg.Redis.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	// Half the call bound: the write and its WAIT each get one bound.
	return store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix, WaitReplicas: wait, WaitTimeout: timeout / 2}), nil
}

// legacyHandleLifetime is how long after this release issues its first
// keyed handle a legacy handle may still be alive: one issued by a replica
// of the older release just before it was replaced lives up to the longest
// session, and the rollout may take up to handle.LegacyGrace.
func legacyHandleLifetime(cfg CredentialsConfig) time.Duration {
	maxTTL := cfg.MaxSessionTTL
	if maxTTL <= 0 {
		maxTTL = credentials.DefaultMaxSessionTTL
	}
	return maxTTL + handle.LegacyGrace
}

// NewCredentialsService builds the credentials service on a store and a transit.
func NewCredentialsService(cfg CredentialsConfig, st store.Store, tr transit.Transit, logger *slog.Logger) (*credentials.Service, error) {
	allow, err := upstream.ParseAllowList(cfg.AllowedUpstreams)
	if err != nil {
		return nil, fmt.Errorf("--allowed-upstreams: %w", err)
	}
	timeout := cfg.UpstreamTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	authorizer := cfg.Authorizer
	if authorizer == nil {
		authorizer = allowAll{}
	}
	keys, err := loadHandleKeys(cfg.HandleKeys, cfg.HandleKeyFile)
	if err != nil {
		return nil, err
	}
	tuning, err := cfg.tuning()
	if err != nil {
		return nil, err
	}
	// The login budgets and refused tokens live beside the records, under
	// the store's prefix, so every replica of this service shares them.
	var (
		rdb    redis.UniversalClient
		prefix = cmp.Or(cfg.RedisPrefix, "fb")
	)
	if rs, ok := st.(*store.Redis); ok {
		rdb, prefix = rs.Client(), rs.Prefix()
	}
	reg, err := newProviders(cfg.Providers, timeout, allow, cfg.Metrics, tuning, rdb, prefix, logger)
	if err != nil {
		return nil, err
	}
	if cfg.LegacyResolveSecret {
		logger.Warn("--legacy-resolve-secret: the retired ResolveSecret hands long-lived secrets to the gateway; turn it off once every gateway is upgraded")
	}
	connect, events, err := cfg.connectAndEvents(logger)
	if err != nil {
		return nil, err
	}
	svc, err := credentials.New(credentials.Config{
		Authorizer:                 authorizer,
		Store:                      st,
		Transit:                    tr,
		Providers:                  reg,
		AllowList:                  allow,
		MaxSessionTTL:              cfg.MaxSessionTTL,
		Logger:                     logger,
		LegacyResolveSecret:        cfg.LegacyResolveSecret,
		HandleKeys:                 keys,
		LegacyHandles:              cfg.LegacyHandles,
		LegacyHandleLifetime:       legacyHandleLifetime(cfg),
		WriteLegacyFormats:         cfg.WriteLegacyFormats,
		RefuseLegacyAssociatedData: cfg.RefuseLegacyAssociatedData,
		Redis:                      rdb,
		RedisPrefix:                prefix,
		Connect:                    connect,
		Events:                     events,
	})
	if err != nil {
		return nil, fmt.Errorf("credentials service: %w", err)
	}
	return svc, nil
}

// batchedTransit wraps tr so that concurrent calls share Vault batch calls
// (measured by cmd/fleetbroker-bench: docs/benchmarks.md), unless opts turn
// batching off (MaxItems 1).
func batchedTransit(tr transit.BatchingBackend, opts transit.BatchOptions) (transit.Transit, error) {
	switch {
	case opts.MaxItems < 0 || opts.MaxInFlight < 0:
		return nil, fmt.Errorf("--transit-batch-size and --transit-batch-calls must not be negative")
	case opts.MaxWait < 0 || opts.MaxWait > maxTransitBatchWait:
		return nil, fmt.Errorf("--transit-batch-wait must be between 0 and %s", maxTransitBatchWait)
	case opts.MaxItems == 1:
		return tr, nil
	}
	return transit.NewBatching(tr, opts), nil
}

// maxTransitBatchWait bounds how long a batch may be held for company: a
// lone call pays it in full, twice per PutCredential.
const maxTransitBatchWait = 100 * time.Millisecond

// RunRewrap rewraps every stored ciphertext under the newest transit key
// version (after `vault write transit/keys/<key>/rotate`).
func RunRewrap(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger, progress func(credentials.RewrapProgress)) (credentials.RewrapProgress, error) {
	var p credentials.RewrapProgress
	err := withOfflineService(ctx, cfg, logger, func(svc *credentials.Service) error {
		var err error
		p, err = svc.Rewrap(ctx, progress)
		return err
	})
	return p, err
}

// RunMigrate re-seals every secret stored with version 1 associated data
// under version 2 (see credentials.Service.Migrate).
func RunMigrate(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger, progress func(credentials.MigrateProgress)) (credentials.MigrateProgress, error) {
	var p credentials.MigrateProgress
	err := withOfflineService(ctx, cfg, logger, func(svc *credentials.Service) error {
		var err error
		p, err = svc.Migrate(ctx, progress)
		return err
	})
	return p, err
}

// withOfflineService runs fn on a credentials service that serves no
// calls, on the configured Vault and Redis: for maintenance commands. It
// needs no handle keys (it issues and checks no handle), so unless some are
// configured it gets throwaway ones.
func withOfflineService(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger, fn func(*credentials.Service) error) error {
	if cfg.HandleKeys == nil && cfg.HandleKeyFile == "" {
		keys, err := handle.GenerateKeys()
		if err != nil {
			return err
		}
		cfg.HandleKeys = keys
	}
	vault, err := NewVault(ctx, cfg.Vault, logger)
	if err != nil {
		return err
	}
	defer vault.Close()
	rdb, err := NewRedis(ctx, cfg.Redis)
	if err != nil {
		return err
	}
	defer rdb.Close()
	st, err := credentialStore(ctx, cfg, rdb, logger)
	if err != nil {
		return err
	}
	svc, err := NewCredentialsService(cfg, st, vault, logger)
	if err != nil {
		return err
	}
	return fn(svc)
}

// allowAll lets every caller do everything: the authorizer of a service
// built without one (in-process tests). RunCredentials and dev always pass
// a real one.
type allowAll struct{}

func (allowAll) Require(context.Context, policy.Action, string) error { return nil }

func (allowAll) GrantableScopes(context.Context, string) []string {
	return []string{policy.ScopeRead, policy.ScopeRaw}
}
