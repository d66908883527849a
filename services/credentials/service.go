// Package credentials is the credentials service: it stores customer secrets
// for Wialon and FleetUp encrypted by Vault transit under a per-tenant derived
// key, validates them against the provider, rotates and deletes them, and
// issues short-lived session handles scoped to one credential.
//
// A stored secret never leaves this service except through ResolveSecret,
// which only the gateway may call (enforced by policy), and never appears in
// a log line, an error or a metric.
package credentials

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
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

// Validator asks a provider whether a secret is good. Implementations must
// not log the secret.
type Validator interface {
	// ValidateWialon logs in with token (and logs out again) and returns
	// the Wialon user name.
	ValidateWialon(ctx context.Context, baseURL, token string) (user string, err error)
	// ValidateFleetUp mints a JWT with the key, account and secret.
	ValidateFleetUp(ctx context.Context, baseURL, apiKey string, accountID int64, secret string) error
}

// Config wires the service to its dependencies.
type Config struct {
	Store     store.Store
	Transit   transit.Transit
	Validator Validator
	// AllowList decides which self-hosted base URLs a credential may name.
	AllowList *upstream.AllowList
	// MaxSessionTTL caps IssueSession's ttl (default 1 h).
	MaxSessionTTL time.Duration
	Logger        *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Service implements CredentialService and SessionService.
type Service struct {
	cfg Config
}

// New checks cfg and returns the service.
func New(cfg Config) (*Service, error) {
	if cfg.Store == nil || cfg.Transit == nil || cfg.Validator == nil {
		return nil, fmt.Errorf("credentials service: store, transit and validator are required")
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
	return &Service{cfg: cfg}, nil
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
