package app

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// builder assembles one server from Deps, completing them as it goes: it
// reads the files a config names, dials what is missing, and pushes a
// closer for everything it opens.
type builder struct {
	d       Deps
	logger  *slog.Logger
	closers closeStack
	sec     *security
	// authorizeHandler wraps the authorization callback's handler (dev adds
	// its stand-in return page); nil: none.
	authorizeHandler func(http.Handler) http.Handler
}

func newBuilder(d Deps) *builder { return &builder{d: d, logger: d.logger()} }

// fail releases everything opened so far and returns err.
func (b *builder) fail(err error) (*Built, error) {
	b.closers.closeAll()
	return nil, err
}

// loadFiles reads the handle keys (unless given) and the security
// settings' files: everything on disk, before anything is dialled.
func (b *builder) loadFiles(handleKeyFile string, sec SecurityConfig, policyRequired bool) error {
	if b.d.HandleKeys == nil {
		keys, err := loadHandleKeys(handleKeyFile)
		if err != nil {
			return err
		}
		b.d.HandleKeys = keys
	}
	s, err := loadSecurity(sec, b.d, policyRequired, &b.closers)
	if err != nil {
		return err
	}
	b.sec = s
	return nil
}

// dial connects to Vault and Redis unless they were given, measured in the
// metrics (if any) and Redis traced when tracing is on.
func (b *builder) dial(ctx context.Context, vc VaultConfig, rc RedisConfig) error {
	if b.d.Transit == nil {
		vc.OnCall = b.d.Metrics.ObserveVault
		vault, err := NewVault(ctx, vc, b.logger)
		if err != nil {
			return err
		}
		b.closers.push(func() { vault.Close() })
		b.d.Transit = vault
	}
	if b.d.Redis == nil {
		rdb, err := NewRedis(ctx, rc)
		if err != nil {
			return err
		}
		b.closers.push(func() { rdb.Close() })
		if err := instrumentRedis(rdb, b.d.Metrics); err != nil {
			return err
		}
		b.d.Redis = rdb
	}
	return nil
}

// authorize makes the server's authorizer for rules (see security.authorize).
func (b *builder) authorize(rules map[string]authz.Rule, requirePrincipal bool, prefix string) error {
	return b.sec.authorize(rules, b.d.HandleKeys, requirePrincipal, b.d.Redis, prefix, b.logger)
}

// component is one service as a server carries it.
type component struct {
	register  func(*grpc.Server)
	readiness []server.Check
	beside    []func(context.Context) error
}

// server builds the gRPC server of comps on settings, with the security,
// metrics, tracing and every component's readiness checks (each name once),
// and the Built that serves it.
func (b *builder) server(settings server.Config, comps ...component) (*Built, error) {
	cfg := settings
	cfg.Logger = b.logger
	cfg.Metrics = b.d.Metrics
	if telemetry.TracingEnabled() {
		cfg.StatsHandler = telemetry.TracingServerHandler()
	}
	seen := map[string]bool{}
	var register []func(*grpc.Server)
	var beside []func(context.Context) error
	for _, c := range comps {
		register = append(register, c.register)
		beside = append(beside, c.beside...)
		for _, check := range c.readiness {
			if !seen[check.Name] {
				seen[check.Name] = true
				cfg.Readiness = append(cfg.Readiness, check)
			}
		}
	}
	cfg = b.sec.serverConfig(cfg)
	srv, err := server.New(cfg, register...)
	if err != nil {
		return nil, err
	}
	b.sec.checkRules(srv, b.logger)
	return &Built{GRPC: srv, beside: beside, closers: b.closers}, nil
}

// Service is the configuration of a server subcommand (*CredentialsConfig,
// *GatewayConfig): it fills its defaults, checks itself against the parts
// given, and plans its build.
type Service interface {
	SetDefaults()
	validate(Deps) error
	plan(context.Context, Deps) serverPlan
	serviceName() string
	metricsListen() string
}

// buildService fills cfg's defaults, checks it (every problem at once,
// before anything is read or dialled) and builds its server.
func buildService(ctx context.Context, cfg Service, d Deps) (*Built, error) {
	cfg.SetDefaults()
	if err := cfg.validate(d); err != nil {
		return nil, err
	}
	return buildServer(ctx, d, cfg.plan(ctx, d))
}

// Run builds the server of cfg (`fleetbroker credentials`, `fleetbroker
// gateway`) and serves it until ctx is done.
func Run(ctx context.Context, cfg Service, d Deps) error {
	return run(ctx, cfg.serviceName(), cfg.metricsListen(), d, func(d Deps) (*Built, error) {
		return buildService(ctx, cfg, d)
	})
}

// serverPlan is what one server build needs besides its Deps: the files to
// read, the backends to dial, the authorization rules, and the components
// to serve. Every server subcommand, dev included, builds through it.
type serverPlan struct {
	handleKeyFile  string
	security       SecurityConfig
	policyRequired bool
	vault          VaultConfig
	redis          RedisConfig
	// rules are the methods served; requirePrincipal refuses calls without
	// an identity; prefix holds the caller budgets.
	rules            map[string]authz.Rule
	requirePrincipal bool
	prefix           string
	settings         server.Config
	// authorizeHandler wraps the authorization callback (dev); nil: none.
	authorizeHandler func(http.Handler) http.Handler
	// components builds the services on the prepared builder.
	components func(*builder) ([]component, error)
}

// buildServer builds plan on d in the one visible order: the files are read
// (handle keys, TLS, policy, audit trail), Vault and Redis dialled unless
// given, the authorizer made, then the components and their gRPC server.
// On failure everything opened so far is released.
func buildServer(ctx context.Context, d Deps, plan serverPlan) (*Built, error) {
	b := newBuilder(d)
	b.authorizeHandler = plan.authorizeHandler
	if err := b.loadFiles(plan.handleKeyFile, plan.security, plan.policyRequired); err != nil {
		return b.fail(err)
	}
	if err := b.dial(ctx, plan.vault, plan.redis); err != nil {
		return b.fail(err)
	}
	if err := b.authorize(plan.rules, plan.requirePrincipal, plan.prefix); err != nil {
		return b.fail(err)
	}
	comps, err := plan.components(b)
	if err != nil {
		return b.fail(err)
	}
	built, err := b.server(plan.settings, comps...)
	if err != nil {
		return b.fail(err)
	}
	return built, nil
}

// loadHandleKeys reads the handle keys in file.
func loadHandleKeys(file string) (*handle.Keys, error) {
	if file == "" {
		return nil, errHandleKeyFileRequired
	}
	k, err := handle.LoadKeys(file)
	if err != nil {
		return nil, fmt.Errorf("--handle-key-file: %w", err)
	}
	return k, nil
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

func redisReady(rdb redis.UniversalClient) server.Check {
	return server.Check{Name: "redis", Check: func(ctx context.Context) error { return rdb.Ping(ctx).Err() }}
}

// vaultReady checks that the service's transit key works right now — it
// encrypts and decrypts a fixed value — not only that Vault answers
// sys/health: a Vault that lost the key (restored without it, a dev server
// restarted) is up, unsealed and useless.
func vaultReady(tr transit.Transit) server.Check {
	return server.Check{Name: "vault", Check: func(ctx context.Context) error { return transit.ProbeEncrypt(ctx, tr) }}
}

// run sets up tracing (a no-op unless OTEL_EXPORTER_OTLP_ENDPOINT is set),
// builds with a fresh metrics registry (unless d has one), and serves the
// gRPC port, what runs beside it and the Prometheus listener (if
// metricsListen is set) until ctx is done.
func run(ctx context.Context, service, metricsListen string, d Deps, build func(Deps) (*Built, error)) error {
	stopTracing, err := telemetry.SetupTracing(ctx, service)
	if err != nil {
		return fmt.Errorf("tracing: %w", err)
	}
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = stopTracing(shutdownCtx)
	}()
	if d.Metrics == nil {
		d.Metrics = telemetry.NewMetrics()
	}
	built, err := build(d)
	if err != nil {
		return err
	}
	defer built.Close()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return built.GRPC.Serve(gctx) })
	g.Go(func() error { return built.ServeBeside(gctx) })
	if metricsListen != "" {
		g.Go(func() error { return telemetry.Serve(gctx, metricsListen, d.Metrics.Handler(), d.logger()) })
	}
	return g.Wait()
}
