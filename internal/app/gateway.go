package app

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// GatewayConfig configures `fleetbroker gateway`.
type GatewayConfig struct {
	Server   server.Config
	Security SecurityConfig
	// CredentialsTLS is the gateway's own identity towards the credentials
	// service (client cert and key) and the CA that signed its certificate;
	// CredentialsServerName overrides the name checked in it.
	CredentialsTLS        tlsutil.Files
	CredentialsServerName string
	// CredentialsInsecure dials the credentials service in plaintext
	// (behind a mesh sidecar).
	CredentialsInsecure bool
	// CredentialsAPIKey identifies the gateway to the credentials service
	// where mTLS is not possible (sent as x-api-key).
	CredentialsAPIKey string
	// tenantLimit is the per-tenant request budget, set by RunGateway.
	tenantLimit func(ctx context.Context, tenant string) error
	// CredentialsAddr is the credentials service the gateway resolves handles with.
	CredentialsAddr string
	// Vault is used only for the token cache's data keys (datakey/wrapped
	// and decrypt on its own key), never for customer secrets.
	Vault            VaultConfig
	Redis            RedisConfig
	RedisPrefix      string
	AllowedUpstreams string
	HandleCacheTTL   time.Duration
	// HandleKeyFile holds the credentials service's handle keys, to
	// refuse forged handles before resolving them; HandleKeys, when set,
	// are used instead (tests, dev).
	HandleKeyFile string
	HandleKeys    *handle.Keys
	// FleetUpRawPaths is the comma-separated allow-list of FleetUp paths
	// CallProvider may reach (--fleetup-raw-paths); empty means
	// fleetup.DefaultRawPaths.
	FleetUpRawPaths string
	// FleetUpRate is requests per second per FleetUp account, shared by all
	// replicas; FleetUpBurst the burst above it.
	FleetUpRate      int
	FleetUpBurst     int
	JWTSafetyMargin  time.Duration
	WialonSessionTTL time.Duration
	UpstreamTimeout  time.Duration
	// WialonSessionRequests and WialonSessionHeavy bound the requests, and
	// heavy requests, one shared Wialon session serves at once across
	// replicas (0: Wialon's 10 and 3); WialonLeaseTTL is how long a slot
	// of a replica that died stays taken (0: 15 s).
	WialonSessionRequests int
	WialonSessionHeavy    int
	WialonLeaseTTL        time.Duration
	// WialonRawServices is the raw pass-through's allow-list of Wialon
	// services, comma-separated ("": wialon.DefaultRawServices).
	WialonRawServices string
	// MaxStreamsPerHandle and MaxStreamsPerTenant bound the open
	// WatchPositions streams of one session handle and of one tenant on
	// this replica (0: the gateway's defaults; negative: no limit).
	MaxStreamsPerHandle int
	MaxStreamsPerTenant int
	// PurgeInterval is how often the sessions of deleted or replaced
	// credentials are purged (0: gateway.DefaultPurgeInterval; negative:
	// never, except through Service.PurgeRetired).
	PurgeInterval time.Duration
	// Providers are the providers served; nil means every one
	// (providers.All). Tests add a fake here.
	Providers []provider.Factory
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
	// Metrics records the gateway's metrics (set by RunGateway; nil: none).
	Metrics *telemetry.Metrics
}

// tokenLocalTTL keeps a hot upstream token in the replica's memory this
// long, sparing a Redis read and a decryption per call (measured by
// cmd/fleetbroker-bench); a token replaced by another replica costs at
// most one failed upstream call here.
const tokenLocalTTL = 500 * time.Millisecond

// RunGateway serves the telematics gateway until ctx is done.
func RunGateway(ctx context.Context, cfg GatewayConfig, logger *slog.Logger) error {
	return runServer(ctx, "fleetbroker-gateway", cfg.MetricsListen, logger, func(m *telemetry.Metrics) (*server.Server, func(), error) {
		cfg.Metrics = m
		return BuildGateway(ctx, cfg, logger)
	})
}

// BuildGateway builds the gateway's server and everything under it, in
// order: Vault (data keys), Redis, the credentials client, security, the
// service. The returned func releases them after serving.
func BuildGateway(ctx context.Context, cfg GatewayConfig, logger *slog.Logger) (*server.Server, func(), error) {
	var closers closeStack
	if _, err := cfg.tuning(); err != nil {
		return closers.fail(err) // checked before anything is dialed
	}
	keys, err := loadHandleKeys(cfg.HandleKeys, cfg.HandleKeyFile)
	if err != nil {
		return closers.fail(err)
	}
	cfg.HandleKeys = keys
	vault, rdb, err := openBackends(ctx, cfg.Vault, cfg.Redis, cfg.Metrics, logger, &closers)
	if err != nil {
		return closers.fail(err)
	}
	creds, closeCreds, err := credentialsTransport(cfg, logger)
	if err != nil {
		return closers.fail(err)
	}
	closers.push(closeCreds)
	opts := append([]grpc.DialOption{creds}, cfg.Metrics.ClientDialOptions()...)
	if telemetry.TracingEnabled() {
		opts = append(opts, telemetry.TracingDialOption())
	}
	if cfg.CredentialsAPIKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(apiKeyCredentials{key: cfg.CredentialsAPIKey, secure: !cfg.CredentialsInsecure}))
	}
	// Reconnect within a second of the credentials service's return, not
	// after gRPC's default backoff of up to two minutes.
	opts = append(opts, grpc.WithConnectParams(credentialsConnectParams))
	conn, err := grpc.NewClient(cfg.CredentialsAddr, opts...)
	if err != nil {
		return closers.fail(fmt.Errorf("credentials service client for %s: %w", cfg.CredentialsAddr, err))
	}
	closers.push(func() { conn.Close() })
	// The gateway's own callers are authenticated by their handle; a policy
	// is optional and only names API keys (for per-principal rate limits).
	var src policy.Source = policy.Static(&policy.Policy{})
	if cfg.Security.PolicyFile != "" {
		src = nil
	}
	// Readiness is Redis and reaching the credentials service: with Vault
	// down the gateway still serves every account whose upstream session
	// is cached, and a credentials service that answers (even NOT_SERVING,
	// for its own Vault) still resolves handles.
	srvCfg := observed(cfg.Server, cfg.Metrics, redisReady(rdb), credentialsReady(conn))
	keys, err = loadHandleKeys(cfg.HandleKeys, cfg.HandleKeyFile)
	if err != nil {
		return closers.fail(err)
	}
	cfg.HandleKeys = keys
	sec, srvCfg, err := buildSecurity(cfg.Security, srvCfg, authz.Rules(nil, gateway.SessionMethods), keys, cfg.Security.TLSClientCA != "", src, rdb, cfg.RedisPrefix, logger)
	if err != nil {
		return closers.fail(err)
	}
	closers.push(sec.Close)
	cfg.tenantLimit = sec.limits.LimitTenant
	svc, err := NewGatewayService(cfg, credentialsv1.NewSessionServiceClient(conn), rdb, vault, logger)
	if err != nil {
		return closers.fail(err)
	}
	closers.push(svc.Close)
	srvCfg.Logger = logger
	srv, err := server.New(srvCfg, svc.Register)
	if err != nil {
		return closers.fail(err)
	}
	sec.checkRules(srv, logger)
	return srv, closers.closeAll, nil
}

// credentialsConnectParams redial the credentials service at most a second
// apart while it is unreachable (gRPC's default backs off to two minutes).
var credentialsConnectParams = grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
	MinConnectTimeout: 5 * time.Second,
}

// credentialsReady checks that the credentials service answers at all: a
// health check over the gateway's own connection. Any answer passes — the
// service reports NOT_SERVING for its own dependencies (Vault) while it
// still resolves handles; only failing to reach it fails. A failing check
// also cuts the connection's reconnect backoff short, so the gateway is
// ready again, and calls work, within about a second of the service's
// return.
func credentialsReady(conn *grpc.ClientConn) server.Check {
	health := healthpb.NewHealthClient(conn)
	return server.Check{Name: "credentials", Check: func(ctx context.Context) error {
		_, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		switch status.Code(err) {
		case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
			conn.ResetConnectBackoff()
			return fmt.Errorf("credentials service at %s: %w", conn.Target(), err)
		}
		return nil // any answer, SERVING or not, comes from a reachable service
	}}
}

// credentialsTransport is how the gateway dials the credentials service:
// TLS 1.3 with its own client certificate, or plaintext only if asked.
func credentialsTransport(cfg GatewayConfig, logger *slog.Logger) (grpc.DialOption, func(), error) {
	if cfg.CredentialsInsecure {
		logger.Warn("dialing the credentials service in plaintext (--credentials-insecure): only safe behind a sidecar that originates mTLS")
		return grpc.WithTransportCredentials(insecure.NewCredentials()), func() {}, nil
	}
	if cfg.CredentialsTLS.CAFile == "" {
		return nil, nil, fmt.Errorf("--credentials-ca is required (or --credentials-insecure behind a mesh sidecar)")
	}
	reloader, tlsCfg, err := tlsutil.NewClientConfig(cfg.CredentialsTLS, cfg.CredentialsServerName, logger)
	if err != nil {
		return nil, nil, fmt.Errorf("credentials client TLS: %w", err)
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)), func() { _ = reloader.Close() }, nil
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
	keys, err := loadHandleKeys(cfg.HandleKeys, cfg.HandleKeyFile)
	if err != nil {
		return nil, err
	}
	tuning, err := cfg.tuning()
	if err != nil {
		return nil, err
	}
	reg, err := newProviders(cfg.Providers, timeout, allow, cfg.Metrics, tuning, nil, "", logger)
	if err != nil {
		return nil, err
	}
	svc, err := gateway.New(gateway.Config{
		Sessions:       sessions,
		Providers:      reg,
		Cache:          tokencache.New(rdb, tr, gateway.InstrumentTokenCache(tokencache.Options{Prefix: prefix + ":gw", Logger: logger, LocalTTL: tokenLocalTTL}, cfg.Metrics)),
		Limiter:        ratelimit.New(rdb, prefix+":gw:rl"),
		Redis:          rdb,
		RedisPrefix:    prefix,
		Metrics:        cfg.Metrics,
		AllowList:      allow,
		HandleCacheTTL: cfg.HandleCacheTTL,
		HandleKeys:     keys,
		PurgeInterval:  cfg.PurgeInterval,
		TenantLimit:    cfg.tenantLimit,
		Logger:         logger,

		MaxStreamsPerHandle: cfg.MaxStreamsPerHandle,
		MaxStreamsPerTenant: cfg.MaxStreamsPerTenant,
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	return svc, nil
}

// tuning is what the gateway's flags tell the providers, checked.
func (cfg GatewayConfig) tuning() (provider.Tuning, error) {
	t := provider.Tuning{SessionReuse: cfg.WialonSessionTTL, ExpiryMargin: cfg.JWTSafetyMargin, RawAllow: map[string][]string{},
		SessionLimits: provider.SessionLimits{Requests: cfg.WialonSessionRequests, Heavy: cfg.WialonSessionHeavy, LeaseTTL: cfg.WialonLeaseTTL}}
	if cfg.FleetUpRate > 0 {
		t.AccountLimit = provider.Limit{Rate: cfg.FleetUpRate, Period: time.Second, Burst: max(cfg.FleetUpBurst, 1)}
	}
	if cfg.FleetUpRawPaths != "" {
		paths := strings.Split(cfg.FleetUpRawPaths, ",")
		if _, err := fleetup.NewRawPaths(paths); err != nil {
			return t, fmt.Errorf("--fleetup-raw-paths: %w", err)
		}
		t.RawAllow[fleetup.Name] = paths
	}
	if cfg.WialonSessionRequests < 0 || cfg.WialonSessionHeavy < 0 || cfg.WialonLeaseTTL < 0 {
		return t, fmt.Errorf("--wialon-session-requests, --wialon-session-heavy and --wialon-lease-ttl must not be negative")
	}
	if cfg.WialonLeaseTTL > 0 && cfg.WialonLeaseTTL < time.Second {
		return t, fmt.Errorf("--wialon-lease-ttl must be at least 1s (it is renewed every third of it)")
	}
	if strings.TrimSpace(cfg.WialonRawServices) != "" {
		var services []string
		for _, svc := range strings.Split(cfg.WialonRawServices, ",") {
			if svc = strings.TrimSpace(svc); svc != "" {
				services = append(services, svc)
			}
		}
		if err := wialon.CheckRawServices(services); err != nil {
			return t, fmt.Errorf("--wialon-raw-services: %w", err)
		}
		t.RawAllow[wialon.Name] = services
	}
	return t, nil
}

// apiKeyCredentials sends the gateway's API key with every call to the
// credentials service. It refuses to travel in plaintext unless the
// operator said a sidecar secures the hop.
type apiKeyCredentials struct {
	key    string
	secure bool
}

func (c apiKeyCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{authz.APIKeyHeader: c.key}, nil
}

func (c apiKeyCredentials) RequireTransportSecurity() bool { return c.secure }
