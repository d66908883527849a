// Package gateway is the telematics gateway: it serves normalized telematics
// calls (units, positions, history, trips, a position stream, a raw
// pass-through) for a session handle, calling Wialon and FleetUp for it.
//
// Upstream sessions (Wialon eid, FleetUp JWT) are shared by every replica
// through tokencache, so any number of callers causes one upstream login per
// account per token lifetime. The gateway never logs a handle, a secret, an
// eid or a JWT, and never returns a stored secret to a caller.
package gateway

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/ratelimit"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// Defaults of the upstream behaviour.
const (
	// DefaultJWTSafetyMargin: a cached FleetUp JWT is dropped this long
	// before its exp, so it is re-minted ahead of expiry, never used stale.
	DefaultJWTSafetyMargin = 2 * time.Minute
	// DefaultWialonSessionTTL bounds how long a shared Wialon eid is reused.
	// Wialon idles a session out after ~5 minutes without calls; that case
	// is handled by error 1 → one re-login.
	DefaultWialonSessionTTL = 30 * time.Minute
	// DefaultWialonConcurrency is Wialon's limit of concurrent requests per session.
	DefaultWialonConcurrency = 10
	// loaderLockTTL bounds how long a crashed replica can hold a session's
	// message loader: longer than any one load (upstream timeout) takes.
	loaderLockTTL = 60 * time.Second
	// DefaultWatchInterval is the poll interval of a watcher that names none.
	DefaultWatchInterval = 5 * time.Second
)

// Config wires the gateway to its dependencies.
type Config struct {
	// Sessions is the credentials service's SessionService, reached with the
	// gateway's own identity.
	Sessions credentialsv1.SessionServiceClient
	Cache    *tokencache.Cache
	Limiter  *ratelimit.Limiter
	// Redis holds the cross-replica lock of Wialon's per-session message
	// loader; RedisPrefix prefixes its keys.
	Redis       redis.UniversalClient
	RedisPrefix string
	Wialon      *wialon.Client
	FleetUp     *fleetup.Client
	// AllowList is checked again before every upstream call: the gateway
	// does not trust that a base URL was checked when it was stored.
	AllowList *upstream.AllowList
	// HandleCacheTTL is how long a handle resolution is reused (≤ 5 s).
	HandleCacheTTL time.Duration
	// HandleKeys check a handle's keyed checksum before it is resolved
	// (--handle-key-file, the credentials service's keys); required.
	HandleKeys *handle.Keys
	// InvalidHandleRate and InvalidHandleBurst are each peer's budget of
	// invalid handles (per second, at once); defaults 1 and 20.
	InvalidHandleRate  float64
	InvalidHandleBurst int
	FleetUpRate        ratelimit.Limit
	JWTSafetyMargin    time.Duration
	WialonSessionTTL   time.Duration
	WialonConcurrency  int
	// TenantLimit, if set, takes one request of the tenant's budget once
	// the handle has told which tenant a call is for.
	TenantLimit func(ctx context.Context, tenant string) error
	Logger      *slog.Logger
	// Metrics, if set, counts upstream failures by kind
	// (fleetbroker_gateway_upstream_errors_total). The upstream HTTP calls
	// and the token cache are measured where they are built: see
	// telemetry.InstrumentTransport and InstrumentTokenCache.
	Metrics *telemetry.Metrics
}

// Service implements TelematicsService.
type Service struct {
	telematicsv1.UnimplementedTelematicsServiceServer
	cfg      Config
	resolver *resolver
	// wialonSlots bounds concurrent requests per shared Wialon session in
	// this replica (Wialon allows ~10 per session).
	wialonSlots sync.Map // tokencache.Key → chan struct{}
	hubs        *hubs
	loader      *loaderLock
	// reads coalesces equal concurrent upstream reads (see shared).
	reads singleflight.Group
}

// New checks cfg and returns the gateway.
func New(cfg Config) (*Service, error) {
	if cfg.Sessions == nil || cfg.Cache == nil || cfg.Limiter == nil || cfg.Redis == nil || cfg.Wialon == nil || cfg.FleetUp == nil || cfg.HandleKeys == nil {
		return nil, fmt.Errorf("gateway: sessions client, token cache, limiter, redis, provider clients and handle keys are required")
	}
	if cfg.AllowList == nil {
		allow, err := upstream.ParseAllowList("")
		if err != nil {
			return nil, err
		}
		cfg.AllowList = allow
	}
	if cfg.HandleCacheTTL < 0 || cfg.HandleCacheTTL > maxHandleCacheTTL {
		return nil, fmt.Errorf("gateway: handle cache TTL must be between 0 and %s", maxHandleCacheTTL)
	}
	if cfg.FleetUpRate.Rate <= 0 {
		cfg.FleetUpRate = ratelimit.FleetUp
	}
	if cfg.JWTSafetyMargin <= 0 {
		cfg.JWTSafetyMargin = DefaultJWTSafetyMargin
	}
	if cfg.WialonSessionTTL <= 0 {
		cfg.WialonSessionTTL = DefaultWialonSessionTTL
	}
	if cfg.WialonConcurrency <= 0 {
		cfg.WialonConcurrency = DefaultWialonConcurrency
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.InvalidHandleRate <= 0 {
		cfg.InvalidHandleRate = DefaultInvalidHandleRate
	}
	if cfg.InvalidHandleBurst <= 0 {
		cfg.InvalidHandleBurst = DefaultInvalidHandleBurst
	}
	// Legacy (CRC32) handles pass until the credentials service records
	// that they have all expired, under the same prefix as its own keys.
	verifier := handle.Verifier{Keys: cfg.HandleKeys, Legacy: handle.NewLegacyWindow(cfg.Redis, cmp.Or(cfg.RedisPrefix, "fb"))}
	s := &Service{cfg: cfg, resolver: newResolver(cfg.Sessions, verifier, cfg.HandleCacheTTL, cfg.InvalidHandleRate, cfg.InvalidHandleBurst),
		loader: &loaderLock{client: cfg.Redis, prefix: cfg.RedisPrefix + ":gw", ttl: loaderLockTTL}}
	s.hubs = newHubs(s)
	return s, nil
}

// Register adds TelematicsService to g.
func (s *Service) Register(g *grpc.Server) {
	telematicsv1.RegisterTelematicsServiceServer(g, s)
}
