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
	tr, err := batchedTransit(vault, cfg.TransitBatch)
	if err != nil {
		return closers.fail(err)
	}
	svc, err := NewCredentialsService(cfg, store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix}), tr, logger)
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
	svc, err := credentials.New(credentials.Config{
		Authorizer:    authorizer,
		Store:         st,
		Transit:       tr,
		Validator:     NewProviderValidator(timeout, allow, cfg.Metrics),
		AllowList:     allow,
		MaxSessionTTL: cfg.MaxSessionTTL,
		Logger:        logger,
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
