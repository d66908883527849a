package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"

	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// CredentialsConfig configures `fleetbroker credentials`: settings only,
// as flags give them (the parts it is built from are Deps).
type CredentialsConfig struct {
	Server   server.Config
	Security SecurityConfig
	Vault    VaultConfig
	Redis    RedisConfig
	// RedisPrefix starts every key the service writes (default "fb").
	RedisPrefix      string
	AllowedUpstreams string
	MaxSessionTTL    time.Duration
	// UpstreamTimeout bounds each validation or login call to a provider.
	UpstreamTimeout time.Duration
	// LegacyResolveSecret keeps the retired ResolveSecret answering during
	// a rolling upgrade (--legacy-resolve-secret; off by default).
	LegacyResolveSecret bool
	// HandleKeyFile holds the keys that sign and check session handles
	// (shared with the gateway).
	HandleKeyFile string
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
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
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
}

func (cfg *CredentialsConfig) serviceName() string { return "fleetbroker-credentials" }

func (cfg *CredentialsConfig) metricsListen() string { return cfg.MetricsListen }

// SetDefaults fills the settings left empty with the defaults the flags
// show, as far as an empty value is not itself a setting.
func (cfg *CredentialsConfig) SetDefaults() {
	setServerDefaults(&cfg.Server, DefaultCredentialsListen)
	cfg.Security.SetDefaults()
	setVaultDefaults(&cfg.Vault, DefaultCredentialsTransitKey)
	cfg.Redis.SetDefaults()
	cfg.RedisPrefix = keyspace.Prefix(cfg.RedisPrefix)
	if cfg.MaxSessionTTL <= 0 {
		cfg.MaxSessionTTL = credentials.DefaultMaxSessionTTL
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
	cfg.Events.SetDefaults()
}

// Validate reports every problem of the configuration at once, without
// reading a file or dialling anything: what `fleetbroker credentials`
// checks before it starts (--check-config then reads the files and dials
// Vault and Redis).
func (cfg CredentialsConfig) Validate() error { return cfg.validate(Deps{}) }

// validate is Validate for a build with deps: what they hold needs no setting.
func (cfg CredentialsConfig) validate(d Deps) error {
	var p problems
	p.add(cfg.Security.validate(d.Policy == nil))
	if d.HandleKeys == nil && cfg.HandleKeyFile == "" {
		p.add(errHandleKeyFileRequired)
	}
	if d.Transit == nil {
		p.add(validateVault(cfg.Vault))
	}
	if d.Redis == nil {
		p.add(cfg.Redis.validate())
	}
	if _, err := upstream.ParseAllowList(cfg.AllowedUpstreams); err != nil {
		p.add(fmt.Errorf("--allowed-upstreams: %w", err))
	}
	_, err := cfg.tuning()
	p.add(err)
	p.add(validateTransitBatch(cfg.TransitBatch))
	p.add(cfg.Authorize.validate(cfg.Security, d.AuthorizeListener != nil))
	return p.err()
}

// tuning is what the credentials service's flags tell the providers.
func (cfg CredentialsConfig) tuning() (provider.Tuning, error) {
	t := provider.Tuning{
		LoginLimits: provider.LoginLimits{Succeeded: cfg.WialonLoginLimit, Failed: cfg.WialonFailedLoginLimit,
			EgressGroup: cfg.WialonEgressGroup, RefusedTTL: cfg.WialonRefusedTokenTTL},
		KeepAlive: cfg.WialonKeepAlive,
	}
	var p problems
	if cfg.WialonLoginLimit < 0 || cfg.WialonFailedLoginLimit < 0 || cfg.WialonRefusedTokenTTL < 0 || cfg.WialonKeepAlive < 0 {
		p.add(errors.New("--wialon-login-limit, --wialon-failed-login-limit, --wialon-refused-token-ttl and --wialon-keepalive must not be negative"))
	}
	if cfg.WialonKeepAlive >= 100*24*time.Hour {
		p.add(errors.New("--wialon-keepalive must be well under 100 days: Wialon deletes a token unused for 100 days"))
	}
	if cfg.WialonEgressGroup != "" {
		if err := wialon.CheckEgressGroup(cfg.WialonEgressGroup); err != nil {
			p.add(fmt.Errorf("--wialon-egress-group: %w", err))
		}
	}
	return t, p.err()
}

// maxTransitBatchWait bounds how long a batch may be held for company: a
// lone call pays it in full, twice per PutCredential.
const maxTransitBatchWait = 100 * time.Millisecond

func validateTransitBatch(opts transit.BatchOptions) error {
	switch {
	case opts.MaxItems < 0 || opts.MaxInFlight < 0:
		return errors.New("--transit-batch-size and --transit-batch-calls must not be negative")
	case opts.MaxWait < 0 || opts.MaxWait > maxTransitBatchWait:
		return fmt.Errorf("--transit-batch-wait must be between 0 and %s", maxTransitBatchWait)
	}
	return nil
}

// batchedTransit wraps tr so that concurrent calls share Vault batch calls
// (measured by cmd/fleetbroker-bench: docs/benchmarks.md), unless opts turn
// batching off (MaxItems 1) or tr cannot run mixed batches.
func batchedTransit(tr transit.Transit, opts transit.BatchOptions) (transit.Transit, error) {
	if err := validateTransitBatch(opts); err != nil {
		return nil, err
	}
	backend, ok := tr.(transit.BatchingBackend)
	if !ok || opts.MaxItems == 1 {
		return tr, nil
	}
	return transit.NewBatching(backend, opts), nil
}

// BuildCredentials builds `fleetbroker credentials`, in order: the
// configuration is checked; the files are read (handle keys, TLS, policy,
// audit trail); Vault and Redis are dialled; then the authorizer, the
// store, the service, its gRPC server and, beside it, the authorization
// callback and the background work. Parts in d are used instead of being
// made. Close the Built after serving.
func BuildCredentials(ctx context.Context, cfg CredentialsConfig, d Deps) (*Built, error) {
	return buildService(ctx, &cfg, d)
}

func (cfg *CredentialsConfig) plan(ctx context.Context, d Deps) serverPlan {
	return serverPlan{
		handleKeyFile: cfg.HandleKeyFile, security: cfg.Security, policyRequired: true,
		vault: cfg.Vault, redis: cfg.Redis,
		rules: credentialsRules(d), requirePrincipal: true, prefix: cfg.RedisPrefix,
		settings: cfg.Server,
		components: func(b *builder) ([]component, error) {
			c, err := b.credentials(ctx, *cfg)
			return []component{c}, err
		},
	}
}

// credentialsRules are the credentials service's methods and the actions
// they need, with those of d's services served beside it.
func credentialsRules(d Deps) map[string]authz.Rule {
	rules := authz.Rules(credentials.Actions, nil)
	for m, a := range d.BesideActions {
		rules[m] = authz.Rule{Action: a}
	}
	return rules
}

// withBeside registers register and then beside, if set.
func withBeside(register, beside func(*grpc.Server)) func(*grpc.Server) {
	if beside == nil {
		return register
	}
	return func(s *grpc.Server) { register(s); beside(s) }
}

// credentials builds the credentials service on the builder's parts — the
// store (Redis, its writes waiting for replicas as cfg asks, unless one was
// given), batched transit, handle keys and security — and its callback.
func (b *builder) credentials(ctx context.Context, cfg CredentialsConfig) (component, error) {
	d := b.d
	if d.Store == nil {
		st, err := credentialStore(ctx, cfg, d.Redis, b.logger)
		if err != nil {
			return component{}, err
		}
		d.Store = st
	}
	tr, err := batchedTransit(d.Transit, cfg.TransitBatch)
	if err != nil {
		return component{}, err
	}
	if cfg.WriteLegacyFormats {
		b.logger.Warn("issuing legacy session handles and sealing with version 1 associated data (--write-legacy-formats): turn it off once every replica runs this release")
	}
	svc, err := newCredentialsService(cfg, d, tr, b.sec)
	if err != nil {
		return component{}, err
	}
	b.closers.push(startKeepAlive(svc, cfg.KeepAliveSweep))
	c := component{
		register:  withBeside(svc.Register, d.BesideRegister),
		readiness: []server.Check{redisReady(d.Redis), vaultReady(d.Transit)},
		beside:    []func(context.Context) error{svc.RunBackground},
	}
	authorize, err := b.authorizeServer(cfg, svc)
	if err != nil {
		return component{}, err
	}
	if authorize != nil {
		c.beside = append(c.beside, authorize.Serve)
	}
	return c, nil
}

// NewCredentialsService builds the credentials service alone, for a server
// of the caller's (in-process tests): on d's store (or Redis), transit (as
// it is, without batching) and handle keys, letting every caller do
// everything. Everything else is built as BuildCredentials builds it.
func NewCredentialsService(cfg CredentialsConfig, d Deps) (*credentials.Service, error) {
	cfg.SetDefaults()
	if d.Store == nil && d.Redis != nil {
		d.Store = store.NewRedis(d.Redis, store.RedisOptions{Prefix: cfg.RedisPrefix})
	}
	if d.Store == nil || d.Transit == nil || d.HandleKeys == nil {
		return nil, errors.New("credentials service: a store (or Redis), a transit and handle keys are required")
	}
	return newCredentialsService(cfg, d, d.Transit, nil)
}

// newCredentialsService builds the service on d.Store and tr. sec nil lets
// every caller do everything and records no callback in an audit trail.
func newCredentialsService(cfg CredentialsConfig, d Deps, tr transit.Transit, sec *security) (*credentials.Service, error) {
	logger := d.logger()
	allow, err := upstream.ParseAllowList(cfg.AllowedUpstreams)
	if err != nil {
		return nil, fmt.Errorf("--allowed-upstreams: %w", err)
	}
	tuning, err := cfg.tuning()
	if err != nil {
		return nil, err
	}
	// The login budgets, refused tokens and the legacy handle window live
	// beside the records, under the store's prefix, so every replica of
	// this service shares them.
	var (
		rdb    redis.UniversalClient
		prefix = cfg.RedisPrefix
		legacy *handle.LegacyWindow
	)
	if rs, ok := d.Store.(*store.Redis); ok {
		rdb, prefix = rs.Client(), rs.Prefix()
		legacy = handle.NewLegacyWindow(rdb, prefix)
	}
	reg, err := newProviders(d, cfg.UpstreamTimeout, allow, tuning, rdb, prefix)
	if err != nil {
		return nil, err
	}
	if cfg.LegacyResolveSecret {
		logger.Warn("--legacy-resolve-secret: the retired ResolveSecret hands long-lived secrets to the gateway; turn it off once every gateway is upgraded")
	}
	var authorizer credentials.Authorizer = allowAll{}
	if sec != nil {
		authorizer = sec.authorizer
	}
	connect, events, err := cfg.connectAndEvents(d, sec, logger)
	if err != nil {
		return nil, err
	}
	svc, err := credentials.New(credentials.Config{
		Authorizer:                 authorizer,
		Store:                      d.Store,
		Transit:                    tr,
		Providers:                  reg,
		AllowList:                  allow,
		MaxSessionTTL:              cfg.MaxSessionTTL,
		Logger:                     logger,
		LegacyResolveSecret:        cfg.LegacyResolveSecret,
		HandleKeys:                 d.HandleKeys,
		LegacyHandles:              legacy,
		LegacyHandleLifetime:       cfg.MaxSessionTTL + handle.LegacyGrace,
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

// connectAndEvents builds the authorization flow's and the events'
// configuration; both need d.Redis (without it, both are off).
func (cfg CredentialsConfig) connectAndEvents(d Deps, sec *security, logger *slog.Logger) (*credentials.ConnectConfig, *credentials.Events, error) {
	if d.Redis == nil {
		return nil, nil, nil
	}
	var reg prometheus.Registerer
	if d.Metrics != nil {
		reg = d.Metrics.Registry()
	}
	events, err := credentials.NewEvents(credentials.EventsConfig{
		Client: d.Redis, Prefix: cfg.RedisPrefix, ExpiryWarning: cfg.Events.ExpiryWarning,
		CheckInterval: cfg.Events.CheckInterval, Registerer: reg, Logger: logger,
	})
	if err != nil {
		return nil, nil, err
	}
	a := cfg.Authorize
	if !a.enabled(d) {
		return nil, events, nil
	}
	returnURLs, err := credentials.ParseReturnURLs(a.ReturnURLs)
	if err != nil {
		return nil, nil, fmt.Errorf("--authorize-return-urls: %w", err)
	}
	connect := &credentials.ConnectConfig{
		Client: d.Redis, Prefix: cfg.RedisPrefix, PublicURL: a.PublicURL, ClientID: a.ClientID,
		AccessType: a.AccessType, AllowFullAccess: a.AllowFullAccess, ReturnURLs: returnURLs, LoginURL: a.LoginURL,
		Registerer: reg,
	}
	if sec != nil {
		connect.Audit = sec.audit
	}
	return connect, events, nil
}

// credentialStore is the Redis store of the credentials service, its
// writes waiting for as many replicas as cfg asks.
func credentialStore(ctx context.Context, cfg CredentialsConfig, rdb redis.UniversalClient, logger *slog.Logger) (*store.Redis, error) {
	wait, err := redisWaitReplicas(ctx, rdb, cfg.RedisWaitReplicas, logger)
	if err != nil {
		return nil, err
	}
	// Half the call bound: the write and its WAIT each get one bound.
	return store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix, WaitReplicas: wait, WaitTimeout: cfg.Redis.Timeout / 2}), nil
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

// allowAll lets every caller do everything: the authorizer of a service
// built without one (in-process tests). BuildCredentials and dev always
// pass a real one.
type allowAll struct{}

func (allowAll) Require(context.Context, policy.Action, string) error { return nil }

func (allowAll) GrantableScopes(context.Context, string) []string {
	return []string{policy.ScopeRead, policy.ScopeRaw}
}
