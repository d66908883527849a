// Package provider is the one seam between fleetbroker's services and the
// telematics platforms it brokers (Wialon, FleetUp, …). Each platform is one
// package below this one that implements Provider; a Registry, keyed by the
// credentials.v1 Provider enum, holds them. The credentials service and the
// gateway look providers up here and contain no per-provider branches.
//
// A Provider has two halves, used by two processes:
//
//   - Custody, in the credentials service: everything that touches the
//     customer's long-lived secret — pick it out of a PutCredential request,
//     describe its public metadata, validate it upstream, and log in / mint
//     a short-lived upstream session with it.
//   - Gateway, in the gateway: everything done with a short-lived upstream
//     session — units, latest positions, history, trips, the raw
//     pass-through — and what a cached session holds.
//
// The long-lived secret never crosses from one half to the other: Custody
// returns only the upstream session (a proto message the gateway caches,
// encrypted), and Gateway never sees a secret message.
//
// This package must never log, and never put into an error, a secret or an
// upstream session. Adding a provider is described in docs/gateway.md
// ("Adding a provider").
package provider

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// ID is a provider's value of the credentials.v1 Provider enum, the key of
// the Registry. The telematics.v1 Provider enum uses the same numbers.
type ID = credentialsv1.Provider

// Info names a provider.
type Info struct {
	ID ID
	// Name is the provider's stored name ("wialon"): in credential records,
	// metric labels and upstream errors. Lower case letters only; it never
	// changes once credentials are stored under it.
	Name string
	// TokenKind names its cached upstream sessions in the gateway's token
	// cache and its metrics ("wialon-eid").
	TokenKind string
	// DefaultBaseURL is used when a credential names no base URL.
	DefaultBaseURL string
	// IdleTimeout is how long the upstream keeps a session nobody uses
	// (Wialon: 5 minutes); 0 if sessions do not idle out. The gateway
	// keeps a cached session no longer than it can live idle, counted from
	// its last use.
	IdleTimeout time.Duration
}

// Provider is one telematics platform.
type Provider interface {
	Info() Info
	Custody
	Gateway
}

// Custody is the credentials service's half of a provider: everything that
// needs the long-lived secret. Secrets are the provider's proto messages
// (credentials.v1 WialonSecret, FleetUpSecret, …) without their base URL.
type Custody interface {
	// SecretFromPut returns the secret a PutCredential request carries for
	// this provider without its base URL, the base URL as given (empty for
	// the default) and the request field naming it; ok is false when the
	// request is for another provider.
	SecretFromPut(req *credentialsv1.PutCredentialRequest) (secret proto.Message, baseURL, baseURLField string, ok bool)
	// NewSecret returns an empty secret message, to decode a stored one into.
	NewSecret() proto.Message
	// Describe returns the public metadata of secret.
	Describe(secret proto.Message) Metadata
	// Validate asks the provider whether secret is good, leaving no
	// upstream session behind, and returns the upstream user name if the
	// provider tells it. A rejection is an *upstream.Error of KindRejected
	// or KindAccessDenied.
	Validate(ctx context.Context, baseURL string, secret proto.Message) (user string, err error)
	// Login opens a short-lived upstream session with secret. The session
	// message must not hold the long-lived secret, except what the provider
	// needs on every call (FleetUp's API key), which is documented as a
	// residual risk.
	Login(ctx context.Context, baseURL string, secret proto.Message) (Minted, error)
}

// Metadata is what may be said about a secret without revealing it.
type Metadata struct {
	// AccountID is the provider's public account number (FleetUp acctId);
	// 0 if the provider has none.
	AccountID int64
}

// Minted is an upstream session just opened.
type Minted struct {
	// Session is the provider's session message (credentials.v1
	// WialonUpstreamSession, FleetUpUpstreamSession, …). Secret.
	Session proto.Message
	// Expires is when the upstream ends the session by itself, if it says;
	// zero when it ends only by idling.
	Expires time.Time
}

// Gateway is the gateway's half of a provider: calls made with a shared
// upstream session that the gateway caches and lends out in a Conn.
// Results are the normalized telematics.v1 messages; the gateway sorts and
// pages them.
type Gateway interface {
	// Check refuses a request before any upstream work (no login is spent
	// on it): a unit id this provider cannot have (a *FieldError), or a
	// CallProvider call for another provider (ErrWrongProvider).
	Check(req proto.Message) error
	// CacheTTL is how long the gateway may share a freshly minted session.
	CacheTTL(minted *credentialsv1.MintUpstreamSessionResponse) time.Duration
	// BeforeMint runs on the gateway before it asks the credentials service
	// for a new session (c.Session is nil), e.g. to spend a slot of the
	// account's request budget.
	BeforeMint(ctx context.Context, c *Conn) error
	Units(ctx context.Context, c *Conn) ([]*telematicsv1.Unit, error)
	LatestPositions(ctx context.Context, c *Conn) ([]*telematicsv1.Position, error)
	History(ctx context.Context, c *Conn, unitID string, from, to time.Time) ([]*telematicsv1.Position, error)
	Trips(ctx context.Context, c *Conn, unitID string, from, to time.Time) ([]*telematicsv1.Trip, error)
	// Raw passes a CallProvider request through, after Check accepted it.
	Raw(ctx context.Context, c *Conn, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error)
	// RawTarget names what a CallProvider request asks for, for the audit
	// trail: a service or method and path, never parameters or bodies.
	RawTarget(req *telematicsv1.CallProviderRequest) string
	// Logout ends a session the gateway replaced or purged. Best effort:
	// the gateway logs a failure and goes on.
	Logout(ctx context.Context, c *Conn) error
}

// Target is the credential a gateway call is for. None of it is secret.
type Target struct {
	Tenant     string
	Credential string
	// Generation identifies the exact secret (see ResolveSessionResponse).
	Generation string
	BaseURL    string
	// Account is the public account the credential names (FleetUp acctId
	// in decimal), or "". It is what the caller typed, proven by nothing:
	// never key state shared with other credentials by it (a tenant could
	// name another tenant's account); a provider learns its real account
	// from a minted session.
	Account string
}

// SessionKey identifies the shared upstream session of t in this process
// and across replicas: one per credential generation.
func (t Target) SessionKey() string {
	return t.Tenant + "\x00" + t.Credential + "\x00" + t.Generation
}

// Conn is what the gateway lends a provider for one call: the shared
// upstream session and primitives shared by every gateway replica.
type Conn struct {
	Target
	// Session is the minted session the call must use; nil in BeforeMint.
	Session *credentialsv1.MintUpstreamSessionResponse
	// Pace waits for one request slot of budget (a name the provider
	// chooses, never a secret, and never a value the caller typed that
	// could name another tenant's budget), shared by every replica at
	// limit. It fails with a rate-limit error the gateway reports as
	// RESOURCE_EXHAUSTED when no slot comes in time.
	Pace func(ctx context.Context, budget string, limit Limit) error
	// Hold hands out no slot of budget for d, on every replica: the
	// upstream asked to wait (an HTTP 429's Retry-After). Nil when the
	// gateway shares no budgets.
	Hold func(ctx context.Context, budget string, limit Limit, d time.Duration) error
	// Lock holds the cross-replica lock name of this upstream session until
	// release is called, e.g. for state the provider keeps per session.
	Lock func(ctx context.Context, name string) (release func(), err error)
	// Lease takes one of limit slots named name of this upstream session,
	// shared by every replica and granted in the order asked (first come,
	// first served), waiting within ctx. The holder's replica renews the
	// slot while it is held; a slot whose replica died is freed ttl after
	// its last renewal, so a killed replica cannot hold slots for ever.
	// nil when the process shares nothing (a provider then bounds
	// concurrency in its own process).
	Lease func(ctx context.Context, name string, limit int, ttl time.Duration) (release func(), err error)
}

// Limit is Rate requests per Period, of which up to Burst may come at once.
type Limit struct {
	Rate   int
	Period time.Duration
	Burst  int
}

// OpenSession unpacks the provider's session message from c.Session into
// into. It fails when c holds no session or another provider's.
func OpenSession(c *Conn, into proto.Message) error {
	if c == nil || c.Session == nil || c.Session.GetUpstreamSession() == nil {
		return errors.New("provider: no upstream session")
	}
	if err := anypb.UnmarshalTo(c.Session.GetUpstreamSession(), into, proto.UnmarshalOptions{}); err != nil {
		// The error names the message types only, never their content.
		return fmt.Errorf("provider: cached upstream session is not a %s", into.ProtoReflect().Descriptor().FullName())
	}
	return nil
}

// HistoryPager is a Gateway whose history comes in pages, because the
// upstream loads at most so many messages per request. The gateway uses it
// for GetPositionHistory's page_size and page_token.
type HistoryPager interface {
	HistoryPage(ctx context.Context, c *Conn, req HistoryPageRequest) (HistoryPage, error)
}

// HistoryPageRequest asks for one page of a unit's positions in [From, To].
type HistoryPageRequest struct {
	UnitID   string
	From, To time.Time
	// PageSize is at most this many positions; 0 means the provider's
	// default.
	PageSize int
	// PageToken is the NextPageToken of the previous page, "" for the first.
	PageToken string
}

// HistoryPage is one page of positions, oldest first, and the token of the
// next page ("" on the last page).
type HistoryPage struct {
	Positions     []*telematicsv1.Position
	NextPageToken string
}

// KeepAliver is a Custody whose upstream deletes secrets nobody used for
// a while (Wialon deletes a token unused for 100 days). The credentials
// service validates every stored secret of the provider at least every
// KeepAliveInterval, so a credential nobody calls through stays alive.
type KeepAliver interface {
	KeepAliveInterval() time.Duration
}

type backgroundKey struct{}

// Background marks ctx as work nobody is waiting for (the credentials
// service's keep-alive logins): providers with shared budgets leave room
// in them for the calls callers wait for.
func Background(ctx context.Context) context.Context {
	return context.WithValue(ctx, backgroundKey{}, true)
}

// IsBackground reports whether ctx was marked by Background.
func IsBackground(ctx context.Context) bool {
	b, _ := ctx.Value(backgroundKey{}).(bool)
	return b
}

// ErrWrongProvider means a request is for another provider than the
// session's credential.
var ErrWrongProvider = errors.New("provider: the session's credential belongs to another provider")

// FieldError is a request field this provider cannot accept.
type FieldError struct {
	Field       string
	Description string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Description }

// Env is what a process gives its providers when it builds them.
type Env struct {
	// HTTPClient returns the HTTP client for the named provider's upstream
	// calls: timed, allow-list guarded at dial time, measured. Never nil.
	HTTPClient func(name string) *http.Client
	Tuning     Tuning
	Logger     *slog.Logger
	// Redis, if set, is where providers keep state shared by every
	// replica of the process's service (the credentials service: login
	// budgets and refused secrets), under keys that begin with
	// RedisPrefix + ":". Without it such state is per process.
	Redis       redis.UniversalClient
	RedisPrefix string
}

// Tuning carries the operator's settings that providers read. A zero field
// means the provider's default.
type Tuning struct {
	// SessionReuse bounds how long a session without an upstream expiry
	// is shared (--wialon-session-ttl).
	SessionReuse time.Duration
	// ExpiryMargin replaces a session with an upstream expiry this long
	// before it (--jwt-safety-margin).
	ExpiryMargin time.Duration
	// RawAllow is the operator's allow-list of raw pass-through targets,
	// by provider name (--fleetup-raw-paths, --wialon-raw-services); a
	// provider without an entry uses its own default list.
	RawAllow map[string][]string
	// AccountLimit is the per-account request budget of providers that ask
	// for one (--fleetup-rate, --fleetup-burst).
	AccountLimit Limit
	// SessionLimits bound the requests one upstream session serves at
	// once, across replicas (--wialon-session-requests,
	// --wialon-session-heavy, --wialon-lease-ttl).
	SessionLimits SessionLimits
	// LoginLimits bound logins across the replicas that share an egress
	// address (--wialon-login-limit, --wialon-login-failed-limit,
	// --wialon-egress-group, --wialon-refused-token-ttl).
	LoginLimits LoginLimits
	// KeepAlive is how often at least a stored secret is used upstream, so
	// the upstream does not delete it as unused (--wialon-keepalive).
	KeepAlive time.Duration
}

// SessionLimits bound one upstream session's concurrent requests.
type SessionLimits struct {
	// Requests and Heavy are how many requests, and how many heavy ones
	// (message loads, trips, reports), may run at once.
	Requests, Heavy int
	// LeaseTTL is how long a slot of a replica that stopped renewing it
	// stays taken.
	LeaseTTL time.Duration
}

// LoginLimits bound the logins of every replica behind one egress address.
type LoginLimits struct {
	// Succeeded and Failed are logins a minute.
	Succeeded, Failed int
	// EgressGroup names the egress address the replicas share (a process
	// cannot see its own); replicas with one group share one budget.
	EgressGroup string
	// RefusedTTL is how long a secret the upstream refused is refused
	// again without asking.
	RefusedTTL time.Duration
}

// DefaultUpstreamTimeout bounds each HTTP call to a provider when the
// operator set no --upstream-timeout.
const DefaultUpstreamTimeout = 10 * time.Second

// Factory builds a provider for one process.
type Factory func(Env) Provider

// Registry holds the providers of a process, keyed by ID and by name.
type Registry struct {
	byID   map[ID]Provider
	byName map[string]Provider
	order  []Provider
}

// NewRegistry builds every factory with env. Two providers with one ID or
// one name, or a provider with no name, are an error.
func NewRegistry(env Env, factories ...Factory) (*Registry, error) {
	if env.HTTPClient == nil {
		env.HTTPClient = func(string) *http.Client { return &http.Client{Timeout: DefaultUpstreamTimeout} }
	}
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Registry{byID: map[ID]Provider{}, byName: map[string]Provider{}}
	for _, f := range factories {
		p := f(env)
		info := p.Info()
		switch {
		case info.ID == credentialsv1.Provider_PROVIDER_UNSPECIFIED || info.Name == "" || info.TokenKind == "" ||
			strings.ContainsAny(info.Name+info.TokenKind, ":{} \x00"):
			return nil, fmt.Errorf("provider: %q (id %d) needs an id, a name and a token kind without ':', braces or spaces", info.Name, info.ID)
		case r.byID[info.ID] != nil:
			return nil, fmt.Errorf("provider: id %d registered twice", info.ID)
		case r.byName[info.Name] != nil:
			return nil, fmt.Errorf("provider: name %q registered twice", info.Name)
		}
		r.byID[info.ID] = p
		r.byName[info.Name] = p
		r.order = append(r.order, p)
	}
	sort.Slice(r.order, func(i, j int) bool { return r.order[i].Info().ID < r.order[j].Info().ID })
	return r, nil
}

// Lookup returns the provider with id.
func (r *Registry) Lookup(id ID) (Provider, bool) {
	p, ok := r.byID[id]
	return p, ok
}

// ByName returns the provider stored under name.
func (r *Registry) ByName(name string) (Provider, bool) {
	p, ok := r.byName[name]
	return p, ok
}

// All returns every provider, ordered by ID, in a new slice.
func (r *Registry) All() []Provider {
	return append([]Provider(nil), r.order...)
}

// ForPut finds the provider a PutCredential request is for.
func (r *Registry) ForPut(req *credentialsv1.PutCredentialRequest) (p Provider, secret proto.Message, baseURL, baseURLField string, ok bool) {
	for _, p := range r.order {
		if secret, baseURL, field, ok := p.SecretFromPut(req); ok {
			return p, secret, baseURL, field, true
		}
	}
	return nil, nil, "", "", false
}
