package app

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// GatewayConfig configures `fleetbroker gateway`: settings only, as flags
// give them (the parts it is built from are Deps).
type GatewayConfig struct {
	Server   server.Config
	Security SecurityConfig
	// CredentialsAddr is the credentials service the gateway resolves handles with.
	CredentialsAddr string
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
	// Vault is used only for the token cache's data keys (datakey/wrapped
	// and decrypt on its own key), never for customer secrets.
	Vault VaultConfig
	Redis RedisConfig
	// RedisPrefix starts every key the gateway writes (default "fb"; the
	// credentials service's, whose legacy handle window it reads).
	RedisPrefix      string
	AllowedUpstreams string
	// HandleCacheTTL is how long a handle resolution is reused: 0 (the
	// zero value, no reuse) to 5 s (the flag's default).
	HandleCacheTTL time.Duration
	// HandleKeyFile holds the credentials service's handle keys, to refuse
	// forged handles before resolving them.
	HandleKeyFile string
	// FleetUpRawPaths is the comma-separated allow-list of FleetUp paths
	// CallProvider may reach (--fleetup-raw-paths); empty means
	// fleetup.DefaultRawPaths.
	FleetUpRawPaths string
	// FleetUpRate is requests per second per FleetUp account, shared by all
	// replicas (0: fleetup.DefaultAccountLimit); FleetUpBurst the burst
	// above it.
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
	// MetricsListen serves Prometheus metrics on a separate HTTP listener.
	MetricsListen string
}

func (cfg *GatewayConfig) serviceName() string { return "fleetbroker-gateway" }

func (cfg *GatewayConfig) metricsListen() string { return cfg.MetricsListen }

// SetDefaults fills the settings left empty with the defaults the flags
// show, as far as an empty value is not itself a setting.
func (cfg *GatewayConfig) SetDefaults() {
	setServerDefaults(&cfg.Server, DefaultGatewayListen)
	cfg.Security.SetDefaults()
	setVaultDefaults(&cfg.Vault, DefaultGatewayTransitKey)
	cfg.Redis.SetDefaults()
	cfg.RedisPrefix = keyspace.Prefix(cfg.RedisPrefix)
	if cfg.CredentialsAddr == "" {
		cfg.CredentialsAddr = DefaultCredentialsAddr
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = DefaultUpstreamTimeout
	}
}

// Validate reports every problem of the configuration at once, without
// reading a file or dialling anything.
func (cfg GatewayConfig) Validate() error { return cfg.validate(Deps{}) }

func (cfg GatewayConfig) validate(d Deps) error {
	var p problems
	// The gateway's callers are authorized by their handle: a policy is
	// optional and only names API keys (for per-principal rate limits).
	p.add(cfg.Security.validate(false))
	if d.HandleKeys == nil && cfg.HandleKeyFile == "" {
		p.add(errHandleKeyFileRequired)
	}
	if d.Transit == nil {
		p.add(validateVault(cfg.Vault))
	}
	if d.Redis == nil {
		p.add(cfg.Redis.validate())
	}
	if d.CredentialsConn == nil && !cfg.CredentialsInsecure && cfg.CredentialsTLS.CAFile == "" {
		p.add(errors.New("--credentials-ca is required (or --credentials-insecure behind a mesh sidecar)"))
	}
	if _, err := upstream.ParseAllowList(cfg.AllowedUpstreams); err != nil {
		p.add(fmt.Errorf("--allowed-upstreams: %w", err))
	}
	if cfg.HandleCacheTTL < 0 || cfg.HandleCacheTTL > gateway.MaxHandleCacheTTL {
		p.add(fmt.Errorf("--handle-cache-ttl must be between 0 and %s: revocation takes effect within it", gateway.MaxHandleCacheTTL))
	}
	_, err := cfg.tuning()
	p.add(err)
	return p.err()
}

// tuning is what the gateway's flags tell the providers, checked.
func (cfg GatewayConfig) tuning() (provider.Tuning, error) {
	t := provider.Tuning{SessionReuse: cfg.WialonSessionTTL, ExpiryMargin: cfg.JWTSafetyMargin, RawAllow: map[string][]string{},
		SessionLimits: provider.SessionLimits{Requests: cfg.WialonSessionRequests, Heavy: cfg.WialonSessionHeavy, LeaseTTL: cfg.WialonLeaseTTL}}
	var p problems
	if cfg.FleetUpRate > 0 {
		t.AccountLimit = provider.Limit{Rate: cfg.FleetUpRate, Period: time.Second, Burst: max(cfg.FleetUpBurst, 1)}
	}
	if cfg.FleetUpRawPaths != "" {
		paths := strings.Split(cfg.FleetUpRawPaths, ",")
		if _, err := fleetup.NewRawPaths(paths); err != nil {
			p.add(fmt.Errorf("--fleetup-raw-paths: %w", err))
		}
		t.RawAllow[fleetup.Name] = paths
	}
	if cfg.WialonSessionRequests < 0 || cfg.WialonSessionHeavy < 0 || cfg.WialonLeaseTTL < 0 {
		p.add(errors.New("--wialon-session-requests, --wialon-session-heavy and --wialon-lease-ttl must not be negative"))
	}
	if cfg.WialonLeaseTTL > 0 && cfg.WialonLeaseTTL < time.Second {
		p.add(errors.New("--wialon-lease-ttl must be at least 1s (it is renewed every third of it)"))
	}
	if strings.TrimSpace(cfg.WialonRawServices) != "" {
		var services []string
		for _, svc := range strings.Split(cfg.WialonRawServices, ",") {
			if svc = strings.TrimSpace(svc); svc != "" {
				services = append(services, svc)
			}
		}
		if err := wialon.CheckRawServices(services); err != nil {
			p.add(fmt.Errorf("--wialon-raw-services: %w", err))
		}
		t.RawAllow[wialon.Name] = services
	}
	return t, p.err()
}

// tokenLocalTTL keeps a hot upstream token in the replica's memory this
// long, sparing a Redis read and a decryption per call (measured by
// cmd/fleetbroker-bench); a token replaced by another replica costs at
// most one failed upstream call here.
const tokenLocalTTL = 500 * time.Millisecond

// BuildGateway builds `fleetbroker gateway`, in order: the configuration
// is checked; the files are read (handle keys, TLS, policy, audit trail);
// Vault (data keys only) and Redis are dialled, and the credentials
// service's client made; then the authorizer, the service and its gRPC
// server. Parts in d are used instead of being made. Close the Built after
// serving.
func BuildGateway(ctx context.Context, cfg GatewayConfig, d Deps) (*Built, error) {
	return buildService(ctx, &cfg, d)
}

func (cfg *GatewayConfig) plan(_ context.Context, _ Deps) serverPlan {
	return serverPlan{
		// The gateway's callers are authorized by their handle: no policy
		// is required.
		handleKeyFile: cfg.HandleKeyFile, security: cfg.Security,
		vault: cfg.Vault, redis: cfg.Redis,
		rules: authz.Rules(nil, gateway.SessionMethods), requirePrincipal: cfg.Security.TLSClientCA != "", prefix: cfg.RedisPrefix,
		settings: cfg.Server,
		components: func(b *builder) ([]component, error) {
			if err := b.dialCredentials(*cfg); err != nil {
				return nil, err
			}
			c, err := b.gateway(*cfg)
			return []component{c}, err
		},
	}
}

// gateway builds the gateway service on the builder's parts, its callers'
// tenant budgets those of the server's security.
func (b *builder) gateway(cfg GatewayConfig) (component, error) {
	svc, err := newGatewayService(cfg, b.d, b.sec.limits.LimitTenant)
	if err != nil {
		return component{}, err
	}
	b.closers.push(svc.Close)
	// Readiness is Redis and reaching the credentials service: with Vault
	// down the gateway still serves every account whose upstream session
	// is cached, and a credentials service that answers (even NOT_SERVING,
	// for its own Vault) still resolves handles.
	return component{
		register:  svc.Register,
		readiness: []server.Check{redisReady(b.d.Redis), credentialsReady(b.d.CredentialsConn)},
	}, nil
}

// NewGatewayService builds the gateway alone, for a server of the caller's
// (in-process tests): on d's credentials connection, Redis (token cache,
// locks and budgets), transit (data keys) and handle keys. Everything else
// is built as BuildGateway builds it.
func NewGatewayService(cfg GatewayConfig, d Deps) (*gateway.Service, error) {
	cfg.SetDefaults()
	if d.CredentialsConn == nil || d.Redis == nil || d.Transit == nil || d.HandleKeys == nil {
		return nil, errors.New("gateway: a credentials connection, Redis, a transit and handle keys are required")
	}
	return newGatewayService(cfg, d, nil)
}

// newGatewayService builds the gateway on d; tenantLimit, if set, takes
// one request of a tenant's budget per call.
func newGatewayService(cfg GatewayConfig, d Deps, tenantLimit func(ctx context.Context, tenant string) error) (*gateway.Service, error) {
	logger := d.logger()
	allow, err := upstream.ParseAllowList(cfg.AllowedUpstreams)
	if err != nil {
		return nil, fmt.Errorf("--allowed-upstreams: %w", err)
	}
	tuning, err := cfg.tuning()
	if err != nil {
		return nil, err
	}
	reg, err := newProviders(d, cfg.UpstreamTimeout, allow, tuning, nil, "")
	if err != nil {
		return nil, err
	}
	svc, err := gateway.New(gateway.Config{
		Sessions:       credentialsv1.NewSessionServiceClient(d.CredentialsConn),
		Providers:      reg,
		Cache:          tokencache.New(d.Redis, d.Transit, gateway.InstrumentTokenCache(tokencache.Options{Prefix: cfg.RedisPrefix + ":gw", Logger: logger, LocalTTL: tokenLocalTTL}, d.Metrics)),
		Limiter:        ratelimit.New(d.Redis, cfg.RedisPrefix+":gw:rl"),
		Redis:          d.Redis,
		RedisPrefix:    cfg.RedisPrefix,
		Metrics:        d.Metrics,
		AllowList:      allow,
		HandleCacheTTL: cfg.HandleCacheTTL,
		HandleKeys:     d.HandleKeys,
		PurgeInterval:  cfg.PurgeInterval,
		TenantLimit:    tenantLimit,
		Logger:         logger,

		MaxStreamsPerHandle: cfg.MaxStreamsPerHandle,
		MaxStreamsPerTenant: cfg.MaxStreamsPerTenant,
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	return svc, nil
}

// dialCredentials makes the client of the credentials service, unless one
// was given: TLS 1.3 with the gateway's own certificate (or plaintext only
// if asked), its API key, metrics and tracing, and a reconnect within a
// second of the service's return.
func (b *builder) dialCredentials(cfg GatewayConfig) error {
	if b.d.CredentialsConn != nil {
		return nil
	}
	creds, err := b.credentialsTransport(cfg)
	if err != nil {
		return err
	}
	opts := append([]grpc.DialOption{creds}, b.d.Metrics.ClientDialOptions()...)
	if telemetry.TracingEnabled() {
		opts = append(opts, telemetry.TracingDialOption())
	}
	if cfg.CredentialsAPIKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(apiKeyCredentials{key: cfg.CredentialsAPIKey, secure: !cfg.CredentialsInsecure}))
	}
	// gRPC's default backoff waits up to two minutes between redials.
	opts = append(opts, grpc.WithConnectParams(credentialsConnectParams))
	conn, err := grpc.NewClient(cfg.CredentialsAddr, opts...)
	if err != nil {
		return fmt.Errorf("credentials service client for %s: %w", cfg.CredentialsAddr, err)
	}
	b.closers.push(func() { conn.Close() })
	b.d.CredentialsConn = conn
	return nil
}

// credentialsTransport is how the gateway dials the credentials service:
// TLS 1.3 with its own client certificate, or plaintext only if asked.
func (b *builder) credentialsTransport(cfg GatewayConfig) (grpc.DialOption, error) {
	if cfg.CredentialsInsecure {
		b.logger.Warn("dialing the credentials service in plaintext (--credentials-insecure): only safe behind a sidecar that originates mTLS")
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	reloader, tlsCfg, err := tlsutil.NewClientConfig(cfg.CredentialsTLS, cfg.CredentialsServerName, b.logger)
	if err != nil {
		return nil, fmt.Errorf("credentials client TLS: %w", err)
	}
	b.closers.pushCloser(reloader)
	return grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)), nil
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
