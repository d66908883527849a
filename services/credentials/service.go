// Package credentials is the credentials service: it stores customer secrets
// for telematics providers encrypted by Vault transit under a per-tenant
// derived key, validates them against the provider, rotates and deletes them,
// and issues short-lived session handles scoped to one credential.
//
// Custody: a stored long-lived secret never leaves this service. When the
// gateway needs an upstream session it calls MintUpstreamSession, and this
// service logs in with the secret and returns only the short-lived session
// (FleetUp's API key travels with it, by FleetUp's design: docs/security.md).
// The retired ResolveSecret answers only with --legacy-resolve-secret, for
// a rolling upgrade. Providers are reached only through internal/provider.
// No secret ever appears in a log line, an error or a metric.
package credentials

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Defaults for session lifetimes.
const (
	DefaultSessionTTL    = 15 * time.Minute
	DefaultMaxSessionTTL = time.Hour
	defaultPageSize      = 50
)

// Authorizer is the per-handler half of authorization: the interceptor
// already checked the method's action on the request's tenant; handlers
// check requests that name no tenant once they know it, and cap scopes.
type Authorizer interface {
	// Require fails with PERMISSION_DENIED unless the caller may do action
	// for tenant.
	Require(ctx context.Context, action policy.Action, tenant string) error
	// GrantableScopes lists the session scopes ("read", "raw") the caller
	// may put on a session of tenant.
	GrantableScopes(ctx context.Context, tenant string) []string
}

// Config wires the service to its dependencies.
type Config struct {
	Store   store.Store
	Transit transit.Transit
	// Providers validate secrets and log in with them; the registry is
	// built with this service's upstream HTTP clients.
	Providers *provider.Registry
	// Authorizer checks what the interceptor could not (see Authorizer).
	Authorizer Authorizer
	// AllowList decides which self-hosted base URLs a credential may name.
	AllowList *upstream.AllowList
	// MaxSessionTTL caps IssueSession's ttl (default 1 h).
	MaxSessionTTL time.Duration
	// HandleKeys sign new session handles and their sessions' bindings,
	// and check both (--handle-key-file, shared with the gateway).
	HandleKeys *handle.Keys
	// LegacyHandles says until when handles with the public CRC32
	// checksum of earlier releases are accepted; nil refuses them. The
	// first keyed handle this service issues closes the window (if no
	// replica did before) LegacyHandleLifetime later.
	LegacyHandles        *handle.LegacyWindow
	LegacyHandleLifetime time.Duration
	// WriteLegacyFormats issues CRC32 handles and seals secrets with
	// version 1 associated data: formats the release before this one
	// reads, for the first phase of a rolling upgrade from it.
	WriteLegacyFormats bool
	// RefuseLegacyAssociatedData refuses to open secrets sealed with
	// version 1 associated data (once `fleetbroker migrate` has re-sealed
	// them all), so an old ciphertext written back into Redis cannot be
	// opened for an edited base URL.
	RefuseLegacyAssociatedData bool
	Logger                     *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
	// LegacyResolveSecret keeps the retired ResolveSecret answering, for a
	// rolling upgrade from gateways that still call it
	// (--legacy-resolve-secret). Off, it answers UNIMPLEMENTED.
	LegacyResolveSecret bool
	// Redis, if set, holds the keep-alive's sweep lease
	// (<RedisPrefix>:keepalive), so one replica sweeps per interval.
	Redis       redis.UniversalClient
	RedisPrefix string
	// Connect configures the Wialon authorization flow (nil: off).
	Connect *ConnectConfig
	// Events publishes credential events and serves WatchCredentialEvents
	// (nil: off).
	Events *Events
}

// Service implements CredentialService and SessionService.
type Service struct {
	cfg Config
	// connect is the Wialon authorization flow; nil when it is off.
	connect *connector
	// legacyClosed is set once this replica has recorded the end of the
	// legacy handle window.
	legacyClosed atomic.Bool
}

// New checks cfg and returns the service.
func New(cfg Config) (*Service, error) {
	if cfg.Store == nil || cfg.Transit == nil || cfg.Providers == nil || cfg.Authorizer == nil || cfg.HandleKeys == nil {
		return nil, fmt.Errorf("credentials service: store, transit, providers, authorizer and handle keys are required")
	}
	if cfg.AllowList == nil {
		allow, err := upstream.ParseAllowList("")
		if err != nil {
			return nil, err
		}
		cfg.AllowList = allow
	}
	if cfg.MaxSessionTTL <= 0 {
		cfg.MaxSessionTTL = DefaultMaxSessionTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.RedisPrefix = keyspace.Prefix(cfg.RedisPrefix)
	s := &Service{cfg: cfg}
	if cfg.Connect != nil {
		conn, err := newConnector(*cfg.Connect, cfg.Providers)
		if err != nil {
			return nil, fmt.Errorf("credentials service: %w", err)
		}
		s.connect = conn
	}
	return s, nil
}

// Actions maps each method of the service to the policy action it needs;
// the authorization interceptor enforces it and audits every call.
var Actions = map[string]policy.Action{
	credentialsv1.CredentialService_PutCredential_FullMethodName:       policy.CredentialsWrite,
	credentialsv1.CredentialService_GetCredential_FullMethodName:       policy.CredentialsRead,
	credentialsv1.CredentialService_ListCredentials_FullMethodName:     policy.CredentialsRead,
	credentialsv1.CredentialService_DeleteCredential_FullMethodName:    policy.CredentialsWrite,
	credentialsv1.CredentialService_ValidateCredential_FullMethodName:  policy.CredentialsWrite,
	credentialsv1.SessionService_IssueSession_FullMethodName:           policy.SessionsIssue,
	credentialsv1.SessionService_RevokeSession_FullMethodName:          policy.SessionsRevoke,
	credentialsv1.SessionService_ResolveSession_FullMethodName:         policy.SessionsResolve,
	credentialsv1.SessionService_ResolveSecret_FullMethodName:          policy.SessionsResolve,
	credentialsv1.SessionService_ReportRejection_FullMethodName:        policy.SessionsResolve,
	credentialsv1.SessionService_MintUpstreamSession_FullMethodName:    policy.SessionsResolve,
	credentialsv1.SessionService_ListRetiredGenerations_FullMethodName: policy.SessionsResolve,

	// The Wialon authorization flow (authorize.go) and credential events
	// (events.go). A stream's request arrives after the interceptor: the
	// events handler checks the action on the tenant it names.
	credentialsv1.CredentialService_StartWialonAuthorization_FullMethodName: policy.CredentialsWrite,
	credentialsv1.CredentialService_WatchCredentialEvents_FullMethodName:    policy.CredentialsRead,

	// Bulk import (batchput.go): every item belongs to the request's tenant.
	credentialsv1.CredentialService_BatchPutCredentials_FullMethodName: policy.CredentialsWrite,
}

// Register adds both gRPC services to g.
func (s *Service) Register(g *grpc.Server) {
	credentialsv1.RegisterCredentialServiceServer(g, &credentialServer{s: s})
	credentialsv1.RegisterSessionServiceServer(g, &sessionServer{s: s})
}

type credentialServer struct {
	credentialsv1.UnimplementedCredentialServiceServer
	s *Service
}

type sessionServer struct {
	credentialsv1.UnimplementedSessionServiceServer
	s *Service
}
