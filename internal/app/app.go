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

	"google.golang.org/grpc"

	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// CredentialsConfig configures `fleetbroker credentials`.
type CredentialsConfig struct {
	Server           server.Config
	Vault            VaultConfig
	Redis            RedisConfig
	RedisPrefix      string
	AllowedUpstreams string
	MaxSessionTTL    time.Duration
	// UpstreamTimeout bounds each validation call to a provider.
	UpstreamTimeout time.Duration
}

// RunCredentials serves the credentials service until ctx is done.
func RunCredentials(ctx context.Context, cfg CredentialsConfig, logger *slog.Logger) error {
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
	svc, err := NewCredentialsService(cfg, store.NewRedis(rdb, store.RedisOptions{Prefix: cfg.RedisPrefix}), vault, logger)
	if err != nil {
		return err
	}
	return serve(ctx, cfg.Server, logger, svc.Register)
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
	svc, err := credentials.New(credentials.Config{
		Store:         st,
		Transit:       tr,
		Validator:     NewProviderValidator(timeout),
		AllowList:     allow,
		MaxSessionTTL: cfg.MaxSessionTTL,
		Logger:        logger,
	})
	if err != nil {
		return nil, fmt.Errorf("credentials service: %w", err)
	}
	return svc, nil
}

// serve runs one gRPC server with the given registrations until ctx is done.
func serve(ctx context.Context, cfg server.Config, logger *slog.Logger, register ...func(*grpc.Server)) error {
	cfg.Logger = logger
	srv, err := server.New(cfg, register...)
	if err != nil {
		return err
	}
	return srv.Serve(ctx)
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
