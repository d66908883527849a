// Package app composes fleetbroker's subcommands from the service packages:
// it builds each dependency in a visible order, wraps every error with what
// failed, and hands the registered services to the one server bootstrap in
// internal/server. cmd/fleetbroker only parses flags and calls in here.
package app

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/policy"
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
	// UpstreamTimeout bounds each validation call to a provider.
	UpstreamTimeout time.Duration
	// Authorizer is set by RunCredentials from Security; when nil (tests,
	// dev) every caller may do everything.
	Authorizer credentials.Authorizer
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
	// Metrics records the service's metrics (set by RunCredentials; nil: none).
	Metrics *telemetry.Metrics
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
// everything under it, in order: Vault, Redis, security (TLS, policy,
// audit), the service, its gRPC server and its authorization callback
// listener. The returned func releases them after serving.
func BuildCredentialsServers(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) (*CredentialsServers, func(), error) {
	var closers closeStack
	fail := func(err error) (*CredentialsServers, func(), error) {
		closers.closeAll()
		return nil, nil, err
	}
	vault, rdb, err := openBackends(ctx, cfg.Vault, cfg.Redis, cfg.Metrics, logger, &closers)
	if err != nil {
		return fail(err)
	}
	srvCfg := observed(cfg.Server, cfg.Metrics, redisReady(rdb), vaultReady(vault))
	sec, srvCfg, err := buildSecurity(cfg.Security, srvCfg, authz.Rules(credentials.Actions, nil), true, nil, rdb, logger)
	if err != nil {
		return fail(err)
	}
	closers.push(sec.Close)
	cfg.Authorizer = sec.authorizer
	cfg.RedisClient, cfg.Audit = rdb, sec.audit
	svc, err := NewCredentialsService(cfg, store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix}), vault, logger)
	if err != nil {
		return fail(err)
	}
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
	connect, events, err := cfg.connectAndEvents(logger)
	if err != nil {
		return nil, err
	}
	svc, err := credentials.New(credentials.Config{
		Authorizer:    authorizer,
		Store:         st,
		Transit:       tr,
		Validator:     NewProviderValidator(timeout, allow, cfg.Metrics),
		AllowList:     allow,
		MaxSessionTTL: cfg.MaxSessionTTL,
		Logger:        logger,
		Connect:       connect,
		Events:        events,
	})
	if err != nil {
		return nil, fmt.Errorf("credentials service: %w", err)
	}
	return svc, nil
}

// RunRewrap rewraps every stored ciphertext under the newest transit key
// version (after `vault write transit/keys/<key>/rotate`).
func RunRewrap(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger, progress func(credentials.RewrapProgress)) (credentials.RewrapProgress, error) {
	vault, err := NewVault(ctx, cfg.Vault, logger)
	if err != nil {
		return credentials.RewrapProgress{}, err
	}
	defer vault.Close()
	rdb, err := NewRedis(ctx, cfg.Redis)
	if err != nil {
		return credentials.RewrapProgress{}, err
	}
	defer rdb.Close()
	svc, err := NewCredentialsService(cfg, store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix}), vault, logger)
	if err != nil {
		return credentials.RewrapProgress{}, err
	}
	return svc.Rewrap(ctx, progress)
}

// allowAll lets every caller do everything: the authorizer of a service
// built without one (in-process tests). RunCredentials and dev always pass
// a real one.
type allowAll struct{}

func (allowAll) Require(context.Context, policy.Action, string) error { return nil }

func (allowAll) GrantableScopes(context.Context, string) []string {
	return []string{policy.ScopeRead, policy.ScopeRaw}
}
