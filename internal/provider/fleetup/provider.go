package fleetup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Name, TokenKind and the defaults of FleetUp as a provider.
const (
	Name      = providerName
	TokenKind = "fleetup-jwt"
	// DefaultExpiryMargin: a JWT is dropped this long before its exp, so it
	// is minted again ahead of expiry, never used stale.
	DefaultExpiryMargin = 2 * time.Minute
	// DefaultAccountRate and DefaultAccountBurst are FleetUp's requested
	// pace: about one request per second per account, with a small burst
	// so a caller's list-then-detail pair is not spread over two seconds
	// (--fleetup-rate, --fleetup-burst).
	DefaultAccountRate  = 1
	DefaultAccountBurst = 2
)

// DefaultAccountLimit is the budget of an account when the operator set none.
var DefaultAccountLimit = provider.Limit{Rate: DefaultAccountRate, Period: time.Second, Burst: DefaultAccountBurst}

// Provider is FleetUp behind the provider seam.
type Provider struct {
	client *Client
	margin time.Duration
	limit  provider.Limit
	// raw is the operator's allow-list of raw pass-through paths; nil
	// (a list that did not parse) allows none.
	raw *RawPaths
}

// NewProvider is FleetUp's provider.Factory. The raw allow-list comes from
// env.Tuning.RawAllow["fleetup"] (DefaultRawPaths when absent); the
// process checks it with NewRawPaths before it builds providers, and an
// invalid list that got here anyway allows no raw call.
func NewProvider(env provider.Env) provider.Provider {
	p := &Provider{client: New(env.HTTPClient(Name)), margin: env.Tuning.ExpiryMargin, limit: env.Tuning.AccountLimit}
	if p.margin <= 0 {
		p.margin = DefaultExpiryMargin
	}
	if p.limit.Rate <= 0 || p.limit.Period <= 0 || p.limit.Burst <= 0 {
		p.limit = DefaultAccountLimit
	}
	raw, err := NewRawPaths(env.Tuning.RawAllow[Name])
	if err != nil && env.Logger != nil {
		env.Logger.Error("fleetup raw allow-list refused: no raw call will pass", "error", err)
	}
	p.raw = raw
	return p
}

// Info names FleetUp.
func (p *Provider) Info() provider.Info {
	return provider.Info{ID: credentialsv1.Provider_PROVIDER_FLEETUP, Name: Name, TokenKind: TokenKind, DefaultBaseURL: upstream.DefaultFleetUpBaseURL}
}

// SecretFromPut picks the API key, account id and secret out of a
// PutCredential request.
func (p *Provider) SecretFromPut(req *credentialsv1.PutCredentialRequest) (proto.Message, string, string, bool) {
	f := req.GetFleetup()
	if f == nil {
		return nil, "", "", false
	}
	return &credentialsv1.FleetUpSecret{ApiKey: f.GetApiKey(), AccountId: f.GetAccountId(), Secret: f.GetSecret()}, f.GetBaseUrl(), "fleetup.base_url", true
}

// NewSecret returns an empty FleetUpSecret.
func (p *Provider) NewSecret() proto.Message { return &credentialsv1.FleetUpSecret{} }

// Describe returns the account id, which is public.
func (p *Provider) Describe(secret proto.Message) provider.Metadata {
	return provider.Metadata{AccountID: fleetupSecret(secret).GetAccountId()}
}

// Validate mints a JWT and forgets it (FleetUp has no logout).
func (p *Provider) Validate(ctx context.Context, baseURL string, secret proto.Message) (string, error) {
	s := fleetupSecret(secret)
	_, err := p.client.MintToken(ctx, baseURL, s.GetApiKey(), s.GetAccountId(), s.GetSecret())
	return "", err
}

// Login mints a JWT (POST /token). The session holds the JWT and the API
// key every data call must send, never the account secret.
func (p *Provider) Login(ctx context.Context, baseURL string, secret proto.Message) (provider.Minted, error) {
	s := fleetupSecret(secret)
	tok, err := p.client.MintToken(ctx, baseURL, s.GetApiKey(), s.GetAccountId(), s.GetSecret())
	if err != nil {
		return provider.Minted{}, err
	}
	return provider.Minted{
		Session: &credentialsv1.FleetUpUpstreamSession{Jwt: tok.JWT, ApiKey: s.GetApiKey(), AccountId: s.GetAccountId()},
		Expires: tok.Expiry,
	}, nil
}

func fleetupSecret(secret proto.Message) *credentialsv1.FleetUpSecret {
	s, _ := secret.(*credentialsv1.FleetUpSecret)
	return s
}

// Check refuses, before any mint is spent on them, raw calls that are not
// FleetUp calls or that the raw allow-list refuses. Any device id may exist.
func (p *Provider) Check(req proto.Message) error {
	if r, ok := req.(*telematicsv1.CallProviderRequest); ok {
		call := r.GetFleetup()
		if call == nil {
			return provider.ErrWrongProvider
		}
		if _, err := rawBody(call); err != nil {
			return err
		}
		return p.raw.Check(call.GetMethod(), call.GetPath())
	}
	return nil
}

func rawBody(call *telematicsv1.FleetUpCall) (json.RawMessage, error) {
	if call.GetBody() == nil {
		return nil, nil
	}
	b, err := call.GetBody().MarshalJSON()
	if err != nil {
		return nil, &provider.FieldError{Field: "fleetup.body", Description: "not representable as JSON"}
	}
	return b, nil
}

// CacheTTL caches a JWT until its exp minus the safety margin, so it is
// replaced ahead of expiry; a JWT that already lives less than the margin
// is cached for half its remaining life (at least a second).
func (p *Provider) CacheTTL(minted *credentialsv1.MintUpstreamSessionResponse) time.Duration {
	expiry := time.Now().Add(DefaultJWTLifetime)
	if minted.GetExpireTime() != nil {
		expiry = minted.GetExpireTime().AsTime()
	}
	left := time.Until(expiry)
	if ttl := left - p.margin; ttl > 0 && ttl > left/2 {
		return ttl
	}
	return max(left/2, time.Second)
}

// BeforeMint spends a slot of the credential's budget: the mint is a
// FleetUp request like any other, but until it succeeds nothing proves
// which account the credential opens, so it is not charged to an account.
func (p *Provider) BeforeMint(ctx context.Context, c *provider.Conn) error {
	return budget{conn: c, name: credentialBudget(c.Target), limit: p.limit}.Take(ctx)
}

// credentialBudget names the budget of a credential's requests made before
// FleetUp has proven its account: its tenant and credential ids, which a
// caller cannot aim at another tenant's budget.
func credentialBudget(t provider.Target) string {
	return Name + ":cred:" + t.Tenant + ":" + t.Credential
}

// accountBudget names the budget of requests made with a minted JWT: the
// account FleetUp minted it for (its sessionInfo.accountId claim, else the
// acctId the mint succeeded with) on this upstream, so every credential of
// one FleetUp account shares the account's pace, on every replica, and a
// credential whose base URL is another upstream cannot reach it.
func accountBudget(t provider.Target, s *credentialsv1.FleetUpUpstreamSession) string {
	acct := s.GetAccountId()
	if cl, err := parseClaims(s.GetJwt()); err == nil && cl.AccountID != 0 {
		acct = cl.AccountID
	}
	if acct <= 0 {
		return credentialBudget(t)
	}
	sum := sha256.Sum256([]byte(t.BaseURL))
	return Name + ":acct:" + hex.EncodeToString(sum[:8]) + ":" + strconv.FormatInt(acct, 10)
}

// budget lends the client a shared request budget of the gateway.
type budget struct {
	conn  *provider.Conn
	name  string
	limit provider.Limit
}

func (b budget) Take(ctx context.Context) error {
	if b.conn.Pace == nil {
		return nil
	}
	return b.conn.Pace(ctx, b.name, b.limit)
}

func (b budget) Hold(ctx context.Context, d time.Duration) error {
	if b.conn.Hold == nil {
		return nil
	}
	return b.conn.Hold(ctx, b.name, b.limit, d)
}

// auth opens c's session; every request made with it takes a slot of the
// account's budget.
func (p *Provider) auth(c *provider.Conn) (Auth, error) {
	var s credentialsv1.FleetUpUpstreamSession
	if err := provider.OpenSession(c, &s); err != nil {
		return Auth{}, err
	}
	return Auth{BaseURL: c.BaseURL, APIKey: s.GetApiKey(), JWT: s.GetJwt(), AccountID: s.GetAccountId(),
		Budget: budget{conn: c, name: accountBudget(c.Target, &s), limit: p.limit}}, nil
}

// Units lists the devices (POST /devices) with their last positions (POST
// /gpsdata/device-last-location).
func (p *Provider) Units(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Unit, error) {
	auth, err := p.auth(c)
	if err != nil {
		return nil, err
	}
	devices, err := p.client.Devices(ctx, auth)
	if err != nil {
		return nil, err
	}
	last, err := p.lastPositions(ctx, auth)
	if err != nil {
		return nil, err
	}
	out := make([]*telematicsv1.Unit, 0, len(devices))
	for _, d := range devices {
		out = append(out, &telematicsv1.Unit{UnitId: d.ID, Name: d.Name, Provider: telematicsv1.Provider_PROVIDER_FLEETUP, LastPosition: last[d.ID]})
	}
	return out, nil
}

// LatestPositions returns the last position of every device of the account.
func (p *Provider) LatestPositions(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Position, error) {
	auth, err := p.auth(c)
	if err != nil {
		return nil, err
	}
	last, err := p.lastPositions(ctx, auth)
	if err != nil {
		return nil, err
	}
	out := make([]*telematicsv1.Position, 0, len(last))
	for _, pos := range last {
		out = append(out, pos)
	}
	return out, nil
}

func (p *Provider) lastPositions(ctx context.Context, auth Auth) (map[string]*telematicsv1.Position, error) {
	locs, err := p.client.LastLocations(ctx, auth, nil)
	if err != nil {
		return nil, err
	}
	out := make(map[string]*telematicsv1.Position, len(locs))
	for _, l := range locs {
		out[l.DeviceID] = positionProto(l)
	}
	return out, nil
}

// History returns the device's fixes (POST /gpsdata, in 24-hour windows).
func (p *Provider) History(ctx context.Context, c *provider.Conn, unitID string, from, to time.Time) ([]*telematicsv1.Position, error) {
	auth, err := p.auth(c)
	if err != nil {
		return nil, err
	}
	locs, err := p.client.GPSHistory(ctx, auth, unitID, from, to)
	if err != nil {
		return nil, err
	}
	out := make([]*telematicsv1.Position, 0, len(locs))
	for _, l := range locs {
		out = append(out, positionProto(l))
	}
	return out, nil
}

// Trips returns the device's trips (POST /trips/history, in 30-day windows).
func (p *Provider) Trips(ctx context.Context, c *provider.Conn, unitID string, from, to time.Time) ([]*telematicsv1.Trip, error) {
	auth, err := p.auth(c)
	if err != nil {
		return nil, err
	}
	trips, err := p.client.Trips(ctx, auth, unitID, from, to)
	if err != nil {
		return nil, err
	}
	out := make([]*telematicsv1.Trip, 0, len(trips))
	for _, t := range trips {
		trip := provider.NewTrip(unitID, t.From, t.To, t.DistanceM)
		if t.FuelKnown {
			trip.FuelUsedL = proto.Float64(t.FuelL)
		}
		out = append(out, trip)
	}
	return out, nil
}

// RawTarget implements provider.Gateway: the HTTP method and path.
func (p *Provider) RawTarget(req *telematicsv1.CallProviderRequest) string {
	return req.GetFleetup().GetMethod() + " " + req.GetFleetup().GetPath()
}

// Raw passes a read on the raw allow-list through; the API key and JWT are
// cut out of the reply (see Client.Raw).
func (p *Provider) Raw(ctx context.Context, c *provider.Conn, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	call := req.GetFleetup()
	if call == nil {
		return nil, provider.ErrWrongProvider
	}
	body, err := rawBody(call)
	if err != nil {
		return nil, err
	}
	auth, err := p.auth(c)
	if err != nil {
		return nil, err
	}
	code, reply, err := p.client.Raw(ctx, auth, p.raw, call.GetMethod(), call.GetPath(), body)
	if err != nil {
		return nil, err
	}
	return &telematicsv1.CallProviderResponse{HttpStatus: int32(code), Json: string(reply)}, nil
}

// Logout does nothing: FleetUp cannot revoke a JWT; it expires by itself.
func (p *Provider) Logout(context.Context, *provider.Conn) error { return nil }

func positionProto(l Location) *telematicsv1.Position {
	return &telematicsv1.Position{UnitId: l.DeviceID, Time: timestamppb.New(l.Time), Latitude: l.Lat, Longitude: l.Lon,
		SpeedKmh: l.Speed, CourseDeg: l.Heading}
}
