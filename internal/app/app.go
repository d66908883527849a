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

	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
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
	// Authorizer is set by RunCredentials from Security; when nil (tests,
	// dev) every caller may do everything.
	Authorizer credentials.Authorizer
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
	// Metrics records the service's metrics (set by RunCredentials; nil: none).
	Metrics *telemetry.Metrics
}

// RunCredentials serves the credentials service until ctx is done.
func RunCredentials(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) error {
	return runServer(ctx, "fleetbroker-credentials", cfg.MetricsListen, logger, func(m *telemetry.Metrics) (*server.Server, func(), error) {
		cfg.Metrics = m
		return BuildCredentials(ctx, cfg, logger)
	})
}

// BuildCredentials builds the credentials service's server and everything
// under it, in order: Vault, Redis, security (TLS, policy, audit), the
// service. The returned func releases them after serving.
func BuildCredentials(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) (*server.Server, func(), error) {
	var closers closeStack
	vault, rdb, err := openBackends(ctx, cfg.Vault, cfg.Redis, cfg.Metrics, logger, &closers)
	if err != nil {
		return closers.fail(err)
	}
	srvCfg := observed(cfg.Server, cfg.Metrics, redisReady(rdb), vaultReady(vault))
	sec, srvCfg, err := buildSecurity(cfg.Security, srvCfg, authz.Rules(credentials.Actions, nil), true, nil, rdb, logger)
	if err != nil {
		return closers.fail(err)
	}
	closers.push(sec.Close)
	cfg.Authorizer = sec.authorizer
	svc, err := NewCredentialsService(cfg, store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix}), vault, logger)
	if err != nil {
		return closers.fail(err)
	}
	srvCfg.Logger = logger
	srv, err := server.New(srvCfg, svc.Register)
	if err != nil {
		return closers.fail(err)
	}
	sec.checkRules(srv, logger)
	return srv, closers.closeAll, nil
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
	reg, err := newProviders(cfg.Providers, timeout, allow, cfg.Metrics, provider.Tuning{}, logger)
	if err != nil {
		return nil, err
	}
	if cfg.LegacyResolveSecret {
		logger.Warn("--legacy-resolve-secret: the retired ResolveSecret hands long-lived secrets to the gateway; turn it off once every gateway is upgraded")
	}
	svc, err := credentials.New(credentials.Config{
		Authorizer:          authorizer,
		Store:               st,
		Transit:             tr,
		Providers:           reg,
		AllowList:           allow,
		MaxSessionTTL:       cfg.MaxSessionTTL,
		Logger:              logger,
		LegacyResolveSecret: cfg.LegacyResolveSecret,
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
