// Package gateway is the telematics gateway: it serves normalized telematics
// calls (units, positions, history, trips, a position stream, a raw
// pass-through) for a session handle, calling the credential's provider
// through the seam in internal/provider; nothing here knows one provider
// from another.
//
// Upstream sessions (a Wialon eid, a FleetUp JWT) are minted by the
// credentials service, which alone holds the long-lived secrets, and shared
// by every replica through tokencache, bound to the credential generation
// and base URL they were minted for; any number of callers causes one
// upstream login per account per session lifetime. Sessions of deleted or
// replaced credentials are purged (purge.go). The gateway never logs a
// handle, an eid, a JWT or an API key, and never sees a long-lived secret.
package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// Defaults of the upstream behaviour.
const (
	// DefaultJWTSafetyMargin is the default of --jwt-safety-margin: a cached
	// FleetUp JWT is dropped this long before its exp.
	DefaultJWTSafetyMargin = fleetup.DefaultExpiryMargin
	// DefaultWialonSessionTTL is the default of --wialon-session-ttl: how
	// long a shared Wialon eid is reused.
	DefaultWialonSessionTTL = wialon.DefaultSessionReuse
	// sessionLockTTL bounds how long a crashed replica can hold a lock on a
	// shared session (Wialon's message loader): longer than any one load
	// (upstream timeout) takes.
	sessionLockTTL = 60 * time.Second
	// DefaultWatchInterval is the poll interval of a watcher that names none.
	DefaultWatchInterval = 5 * time.Second
	// DefaultMaxStreamsPerHandle and DefaultMaxStreamsPerTenant bound the
	// WatchPositions streams one session handle, and one tenant, may hold
	// open on a gateway replica (--max-streams-per-handle,
	// --max-streams-per-tenant).
	DefaultMaxStreamsPerHandle = 16
	DefaultMaxStreamsPerTenant = 1000
	// DefaultPurgeInterval is how often one replica asks the credentials
	// service which cached upstream sessions belong to deleted or replaced
	// credentials, and purges them (see purge.go).
	DefaultPurgeInterval = 30 * time.Second
)

// Config wires the gateway to its dependencies.
type Config struct {
	// Sessions is the credentials service's SessionService, reached with the
	// gateway's own identity. The gateway calls ResolveSession,
	// MintUpstreamSession, ReportRejection and ListRetiredGenerations.
	Sessions credentialsv1.SessionServiceClient
	// Providers are the providers this gateway serves, built with the
	// gateway's upstream HTTP clients and tuning.
	Providers *provider.Registry
	Cache     *tokencache.Cache
	// Limiter holds the per-account request budgets providers pace with
	// (provider.Conn.Pace).
	Limiter *ratelimit.Limiter
	// Redis holds the cross-replica session locks and the index of cached
	// sessions the purge reads; RedisPrefix prefixes their keys.
	Redis       redis.UniversalClient
	RedisPrefix string
	// AllowList is checked again before every upstream call: the gateway
	// does not trust that a base URL was checked when it was stored.
	AllowList *upstream.AllowList
	// HandleCacheTTL is how long a handle resolution is reused (≤ 5 s).
	HandleCacheTTL time.Duration
	// PurgeInterval is how often one replica purges the cached sessions of
	// deleted or replaced credentials; 0 means DefaultPurgeInterval, a
	// negative value turns the periodic purge off (PurgeRetired still works).
	PurgeInterval time.Duration
	// HandleKeys check a handle's keyed checksum before it is resolved
	// (--handle-key-file, the credentials service's keys); required.
	HandleKeys *handle.Keys
	// InvalidHandleRate and InvalidHandleBurst are each peer's budget of
	// invalid handles (per second, at once); defaults 1 and 20.
	InvalidHandleRate  float64
	InvalidHandleBurst int
	// MaxStreamsPerHandle and MaxStreamsPerTenant bound the WatchPositions
	// streams one session handle, and one tenant, may hold open on this
	// replica (0: DefaultMaxStreamsPerHandle, DefaultMaxStreamsPerTenant;
	// negative: no limit).
	MaxStreamsPerHandle int
	MaxStreamsPerTenant int
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
	hubs     *hubs
	streams  *streamLimits
	locks    *sessionLock
	leases   *sessionLeases
	held     *heldIndex
	// touched is when this replica last extended each idle-bound cached
	// session (see touch).
	touched sync.Map // tenant, credential, generation, base URL, kind → time.Time
	touches atomic.Int64
	// reads coalesces equal concurrent upstream reads (see shared).
	reads singleflight.Group

	stopPurge context.CancelFunc
	purgeDone sync.WaitGroup
}

// MaxHandleCacheTTL bounds --handle-cache-ttl (Config.HandleCacheTTL):
// revocation must stay prompt. The composition root checks it before
// building anything.
const MaxHandleCacheTTL = maxHandleCacheTTL

// New checks cfg and returns the gateway, with its periodic purge running
// until Close.
func New(cfg Config) (*Service, error) {
	if cfg.Sessions == nil || cfg.Providers == nil || cfg.Cache == nil || cfg.Limiter == nil || cfg.Redis == nil || cfg.HandleKeys == nil {
		return nil, fmt.Errorf("gateway: sessions client, providers, token cache, limiter, redis and handle keys are required")
	}
	if cfg.AllowList == nil {
		allow, err := upstream.ParseAllowList("")
		if err != nil {
			return nil, err
		}
		cfg.AllowList = allow
	}
	if cfg.HandleCacheTTL < 0 || cfg.HandleCacheTTL > MaxHandleCacheTTL {
		return nil, fmt.Errorf("gateway: handle cache TTL must be between 0 and %s", MaxHandleCacheTTL)
	}
	if cfg.PurgeInterval == 0 {
		cfg.PurgeInterval = DefaultPurgeInterval
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
	if cfg.MaxStreamsPerHandle == 0 {
		cfg.MaxStreamsPerHandle = DefaultMaxStreamsPerHandle
	}
	if cfg.MaxStreamsPerTenant == 0 {
		cfg.MaxStreamsPerTenant = DefaultMaxStreamsPerTenant
	}
	cfg.RedisPrefix = keyspace.Prefix(cfg.RedisPrefix)
	// The credentials service's statuses are made for the gateway, never
	// for its callers: mark them as such (errors.go).
	cfg.Sessions = remoteSessions{cfg.Sessions}
	// Legacy (CRC32) handles pass until the credentials service records
	// that they have all expired, under the same prefix as its own keys.
	verifier := handle.Verifier{Keys: cfg.HandleKeys, Legacy: handle.NewLegacyWindow(cfg.Redis, cfg.RedisPrefix)}
	prefix := cfg.RedisPrefix + ":gw"
	s := &Service{cfg: cfg, resolver: newResolver(cfg.Sessions, verifier, cfg.HandleCacheTTL, cfg.InvalidHandleRate, cfg.InvalidHandleBurst),
		locks:  &sessionLock{client: cfg.Redis, prefix: prefix, ttl: sessionLockTTL},
		leases: &sessionLeases{client: cfg.Redis, prefix: prefix, logger: cfg.Logger},
		held:   &heldIndex{client: cfg.Redis, prefix: prefix}}
	s.hubs = newHubs(s)
	s.streams = newStreamLimits(cfg.MaxStreamsPerHandle, cfg.MaxStreamsPerTenant)
	ctx, cancel := context.WithCancel(context.Background())
	s.stopPurge = cancel
	if cfg.PurgeInterval > 0 {
		s.purgeDone.Add(1)
		go func() {
			defer s.purgeDone.Done()
			s.purgeLoop(ctx)
		}()
	}
	return s, nil
}

// Close stops the periodic purge. Calls in flight are not affected.
func (s *Service) Close() {
	s.stopPurge()
	s.purgeDone.Wait()
}

// Register adds TelematicsService to g.
func (s *Service) Register(g *grpc.Server) {
	telematicsv1.RegisterTelematicsServiceServer(g, s)
}
