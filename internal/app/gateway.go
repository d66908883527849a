package app

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/gateway/ratelimit"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// GatewayConfig configures `fleetbroker gateway`.
type GatewayConfig struct {
	Server server.Config
	// CredentialsAddr is the credentials service the gateway resolves handles with.
	CredentialsAddr string
	// Vault is used only for the token cache's data keys (datakey/wrapped
	// and decrypt on its own key), never for customer secrets.
	Vault            VaultConfig
	Redis            RedisConfig
	RedisPrefix      string
	AllowedUpstreams string
	HandleCacheTTL   time.Duration
	// FleetUpRate is requests per second per FleetUp account, shared by all
	// replicas; FleetUpBurst the burst above it.
	FleetUpRate      int
	FleetUpBurst     int
	JWTSafetyMargin  time.Duration
	WialonSessionTTL time.Duration
	UpstreamTimeout  time.Duration
}

// RunGateway serves the telematics gateway until ctx is done.
func RunGateway(ctx context.Context, cfg GatewayConfig, logger *slog.Logger) error {
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
	conn, err := grpc.NewClient(cfg.CredentialsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("credentials service client for %s: %w", cfg.CredentialsAddr, err)
	}
	defer conn.Close()
	svc, err := NewGatewayService(cfg, credentialsv1.NewSessionServiceClient(conn), rdb, vault, logger)
	if err != nil {
		return err
	}
	return serve(ctx, cfg.Server, logger, svc.Register)
}

// NewGatewayService builds the gateway on a credentials client, a Redis
// client (token cache and rate limits) and a transit (data keys).
func NewGatewayService(cfg GatewayConfig, sessions credentialsv1.SessionServiceClient, rdb redis.UniversalClient, tr transit.Transit, logger *slog.Logger) (*gateway.Service, error) {
	allow, err := upstream.ParseAllowList(cfg.AllowedUpstreams)
	if err != nil {
		return nil, fmt.Errorf("--allowed-upstreams: %w", err)
	}
	timeout := cfg.UpstreamTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	prefix := cfg.RedisPrefix
	if prefix == "" {
		prefix = "fb"
	}
	httpClient := &http.Client{Timeout: timeout}
	rate := ratelimit.FleetUp
	if cfg.FleetUpRate > 0 {
		rate = ratelimit.PerSecond(cfg.FleetUpRate, max(cfg.FleetUpBurst, 1))
	}
	svc, err := gateway.New(gateway.Config{
		Sessions:         sessions,
		Cache:            tokencache.New(rdb, tr, tokencache.Options{Prefix: prefix + ":gw", Logger: logger}),
		Limiter:          ratelimit.New(rdb, prefix+":gw:rl"),
		Redis:            rdb,
		RedisPrefix:      prefix,
		Wialon:           wialon.New(httpClient),
		FleetUp:          fleetup.New(httpClient),
		AllowList:        allow,
		HandleCacheTTL:   cfg.HandleCacheTTL,
		FleetUpRate:      rate,
		JWTSafetyMargin:  cfg.JWTSafetyMargin,
		WialonSessionTTL: cfg.WialonSessionTTL,
		Logger:           logger,
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	return svc, nil
}
