package app

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// closeStack releases what a Build function opened, last opened first.
type closeStack []func()

func (c *closeStack) push(f func()) { *c = append(*c, f) }

func (c *closeStack) closeAll() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

// fail releases everything opened so far and returns err.
func (c *closeStack) fail(err error) (*server.Server, func(), error) {
	c.closeAll()
	return nil, nil, err
}

// openBackends connects to Vault and Redis, both measured in m (nil: not
// measured) and Redis traced when tracing is on, and pushes their closers.
func openBackends(ctx context.Context, vc VaultConfig, rc RedisConfig, m *telemetry.Metrics, logger *slog.Logger, closers *closeStack) (*transit.Vault, redis.UniversalClient, error) {
	vc.OnCall = m.ObserveVault
	vault, err := NewVault(ctx, vc, logger)
	if err != nil {
		return nil, nil, err
	}
	closers.push(func() { vault.Close() })
	rdb, err := NewRedis(ctx, rc)
	if err != nil {
		return nil, nil, err
	}
	closers.push(func() { rdb.Close() })
	if err := instrumentRedis(rdb, m); err != nil {
		return nil, nil, err
	}
	return vault, rdb, nil
}

func instrumentRedis(rdb redis.UniversalClient, m *telemetry.Metrics) error {
	if m != nil {
		rdb.AddHook(m.RedisHook())
	}
	if telemetry.TracingEnabled() {
		if err := telemetry.InstrumentRedisTracing(rdb); err != nil {
			return fmt.Errorf("redis tracing: %w", err)
		}
	}
	return nil
}

// observed completes a server config with metrics, tracing and the
// readiness checks of the dependencies the service cannot work without.
func observed(cfg server.Config, m *telemetry.Metrics, readiness ...server.Check) server.Config {
	cfg.Metrics = m
	if telemetry.TracingEnabled() {
		cfg.StatsHandler = telemetry.TracingServerHandler()
	}
	cfg.Readiness = append(cfg.Readiness, readiness...)
	return cfg
}

func redisReady(rdb redis.UniversalClient) server.Check {
	return server.Check{Name: "redis", Check: func(ctx context.Context) error { return rdb.Ping(ctx).Err() }}
}

// vaultReady checks that the service's transit key works right now — it
// encrypts and decrypts a fixed value — not only that Vault answers
// sys/health: a Vault that lost the key (restored without it, a dev server
// restarted) is up, unsealed and useless.
func vaultReady(v *transit.Vault) server.Check {
	return server.Check{Name: "vault", Check: func(ctx context.Context) error { return transit.ProbeEncrypt(ctx, v) }}
}

// runServer sets up tracing (a no-op unless OTEL_EXPORTER_OTLP_ENDPOINT is
// set), builds the server with a fresh metrics registry, and serves it, with
// the Prometheus listener and whatever beside runs (after the build) beside
// it, until ctx is done.
func runServer(ctx context.Context, service, metricsListen string, logger *slog.Logger, build func(*telemetry.Metrics) (*server.Server, func(), error), beside ...func(context.Context) error) error {
	stopTracing, err := telemetry.SetupTracing(ctx, service)
	if err != nil {
		return fmt.Errorf("tracing: %w", err)
	}
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = stopTracing(shutdownCtx)
	}()
	metrics := telemetry.NewMetrics()
	srv, closeAll, err := build(metrics)
	if err != nil {
		return err
	}
	defer closeAll()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Serve(gctx) })
	for _, f := range beside {
		g.Go(func() error { return f(gctx) })
	}
	if metricsListen != "" {
		g.Go(func() error { return telemetry.Serve(gctx, metricsListen, metrics.Handler(), logger) })
	}
	return g.Wait()
}
