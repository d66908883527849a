package wialon

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Name, TokenKind and the limits of Wialon as a provider.
const (
	Name      = providerName
	TokenKind = "wialon-eid"
	// DefaultSessionReuse bounds how long a shared session is reused. An
	// idle session dies after ~5 minutes; that case is handled by error 1
	// and one re-login.
	DefaultSessionReuse = 30 * time.Minute
	// SessionConcurrency is Wialon's limit of concurrent requests per
	// session, held per gateway replica.
	SessionConcurrency = 10
	// historyLoadCount caps the messages one history call loads.
	historyLoadCount = 10000
	// loaderLock names the cross-replica lock of a session's message
	// loader (messages/load_interval … unload, and the trips built on it):
	// two loads on one shared session at once, from any replica, would
	// read each other's messages.
	loaderLock = "loader"
)

// Provider is Wialon behind the provider seam.
type Provider struct {
	client       *Client
	sessionReuse time.Duration
	// slots bounds concurrent requests per shared session in this process.
	slots sync.Map // provider.Target.SessionKey() → chan struct{}
}

// NewProvider is Wialon's provider.Factory.
func NewProvider(env provider.Env) provider.Provider {
	reuse := env.Tuning.SessionReuse
	if reuse <= 0 {
		reuse = DefaultSessionReuse
	}
	return &Provider{client: New(env.HTTPClient(Name)), sessionReuse: reuse}
}

// Info names Wialon.
func (p *Provider) Info() provider.Info {
	return provider.Info{ID: credentialsv1.Provider_PROVIDER_WIALON, Name: Name, TokenKind: TokenKind, DefaultBaseURL: upstream.DefaultWialonBaseURL}
}

// SecretFromPut picks the access token out of a PutCredential request.
func (p *Provider) SecretFromPut(req *credentialsv1.PutCredentialRequest) (proto.Message, string, string, bool) {
	w := req.GetWialon()
	if w == nil {
		return nil, "", "", false
	}
	return &credentialsv1.WialonSecret{Token: w.GetToken()}, w.GetBaseUrl(), "wialon.base_url", true
}

// NewSecret returns an empty WialonSecret.
func (p *Provider) NewSecret() proto.Message { return &credentialsv1.WialonSecret{} }

// Describe says nothing: a token has no public account number.
func (p *Provider) Describe(proto.Message) provider.Metadata { return provider.Metadata{} }

// Validate logs in with the token and out again at once, so validation
// leaves no upstream session behind, and returns the user name.
func (p *Provider) Validate(ctx context.Context, baseURL string, secret proto.Message) (string, error) {
	s, err := p.client.Login(ctx, baseURL, token(secret))
	if err != nil {
		return "", err
	}
	_ = p.client.Logout(ctx, baseURL, s.SID) // best effort: the session idles out anyway
	return s.User, nil
}

// Login opens a session (token/login). The session message holds the eid,
// never the token.
func (p *Provider) Login(ctx context.Context, baseURL string, secret proto.Message) (provider.Minted, error) {
	s, err := p.client.Login(ctx, baseURL, token(secret))
	if err != nil {
		return provider.Minted{}, err
	}
	return provider.Minted{Session: &credentialsv1.WialonUpstreamSession{Eid: s.SID, User: s.User}}, nil
}

func token(secret proto.Message) string {
	w, _ := secret.(*credentialsv1.WialonSecret)
	return w.GetToken()
}

// Check refuses unit ids that are not Wialon item ids, and raw calls that
// are not Wialon calls, before any login is spent on them.
func (p *Provider) Check(req proto.Message) error {
	switch r := req.(type) {
	case *telematicsv1.GetPositionHistoryRequest:
		_, err := unitID(r.GetUnitId())
		return err
	case *telematicsv1.ListTripsRequest:
		_, err := unitID(r.GetUnitId())
		return err
	case *telematicsv1.CallProviderRequest:
		if r.GetWialon() == nil {
			return provider.ErrWrongProvider
		}
		_, err := rawParams(r.GetWialon())
		return err
	}
	return nil
}

func unitID(id string) (int64, error) {
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil || n <= 0 {
		return 0, &provider.FieldError{Field: "unit_id", Description: "a Wialon unit id is a positive number"}
	}
	return n, nil
}

func rawParams(call *telematicsv1.WialonCall) (json.RawMessage, error) {
	if call.GetParams() == nil {
		return json.RawMessage("{}"), nil
	}
	b, err := call.GetParams().MarshalJSON()
	if err != nil {
		return nil, &provider.FieldError{Field: "wialon.params", Description: "not representable as JSON"}
	}
	return b, nil
}

// CacheTTL is the configured reuse bound: Wialon gives sessions no expiry,
// only an idle timeout.
func (p *Provider) CacheTTL(*credentialsv1.MintUpstreamSessionResponse) time.Duration {
	return p.sessionReuse
}

// BeforeMint does nothing: logins are paced where they happen, in the
// credentials service.
func (p *Provider) BeforeMint(context.Context, *provider.Conn) error { return nil }

// Units lists the account's units with their last position (core/search_items).
func (p *Provider) Units(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Unit, error) {
	units, err := p.search(ctx, c)
	if err != nil {
		return nil, err
	}
	out := make([]*telematicsv1.Unit, 0, len(units))
	for _, u := range units {
		id := strconv.FormatInt(u.ID, 10)
		out = append(out, &telematicsv1.Unit{UnitId: id, Name: u.Name, Provider: telematicsv1.Provider_PROVIDER_WIALON, LastPosition: positionProto(id, u.Pos)})
	}
	return out, nil
}

// LatestPositions returns every unit's last position (core/search_items).
func (p *Provider) LatestPositions(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Position, error) {
	units, err := p.search(ctx, c)
	if err != nil {
		return nil, err
	}
	var out []*telematicsv1.Position
	for _, u := range units {
		if pos := positionProto(strconv.FormatInt(u.ID, 10), u.Pos); pos != nil {
			out = append(out, pos)
		}
	}
	return out, nil
}

func (p *Provider) search(ctx context.Context, c *provider.Conn) ([]Unit, error) {
	sid, release, err := p.use(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	return p.client.SearchUnits(ctx, c.BaseURL, sid)
}

// History loads the unit's positional messages (messages/load_interval,
// then messages/unload) holding the session's loader across replicas.
func (p *Provider) History(ctx context.Context, c *provider.Conn, unit string, from, to time.Time) ([]*telematicsv1.Position, error) {
	id, err := unitID(unit)
	if err != nil {
		return nil, err
	}
	var out []*telematicsv1.Position
	err = p.withLoader(ctx, c, func(sid string) error {
		msgs, err := p.client.LoadMessages(ctx, c.BaseURL, sid, id, from, to, historyLoadCount)
		for _, m := range msgs {
			if pos := positionProto(unit, m.Pos); pos != nil {
				out = append(out, pos)
			}
		}
		return err
	})
	return out, err
}

// Trips returns the unit's trips (unit/get_trips on the loaded interval),
// holding the session's loader across replicas.
func (p *Provider) Trips(ctx context.Context, c *provider.Conn, unit string, from, to time.Time) ([]*telematicsv1.Trip, error) {
	id, err := unitID(unit)
	if err != nil {
		return nil, err
	}
	var out []*telematicsv1.Trip
	err = p.withLoader(ctx, c, func(sid string) error {
		trips, err := p.client.Trips(ctx, c.BaseURL, sid, id, from, to)
		for _, t := range trips {
			out = append(out, provider.NewTrip(unit, t.From, t.To, t.DistanceMeters))
		}
		return err
	})
	return out, err
}

// withLoader runs f holding the loader lock of c's session (taken before
// a concurrency slot, so waiting for the loader holds no slot).
func (p *Provider) withLoader(ctx context.Context, c *provider.Conn, f func(sid string) error) error {
	if c.Lock != nil {
		unlock, err := c.Lock(ctx, loaderLock)
		if err != nil {
			return err
		}
		defer unlock()
	}
	sid, release, err := p.use(ctx, c)
	if err != nil {
		return err
	}
	defer release()
	return f(sid)
}

// Raw passes any service through except those that mint or hand out
// sessions (see Client.Raw).
// RawTarget implements provider.Gateway: the Wialon svc.
func (p *Provider) RawTarget(req *telematicsv1.CallProviderRequest) string {
	return req.GetWialon().GetSvc()
}

func (p *Provider) Raw(ctx context.Context, c *provider.Conn, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	call := req.GetWialon()
	if call == nil {
		return nil, provider.ErrWrongProvider
	}
	params, err := rawParams(call)
	if err != nil {
		return nil, err
	}
	sid, release, err := p.use(ctx, c)
	if err != nil {
		return nil, err
	}
	defer release()
	reply, err := p.client.Raw(ctx, c.BaseURL, sid, call.GetSvc(), params)
	if err != nil {
		return nil, err
	}
	return &telematicsv1.CallProviderResponse{HttpStatus: 200, Json: string(reply)}, nil
}

// Logout ends the session (core/logout).
func (p *Provider) Logout(ctx context.Context, c *provider.Conn) error {
	var s credentialsv1.WialonUpstreamSession
	if err := provider.OpenSession(c, &s); err != nil {
		return err
	}
	return p.client.Logout(ctx, c.BaseURL, s.GetEid())
}

// use opens c's session and takes one of its concurrent-request slots in
// this process, waiting at most as long as ctx allows.
func (p *Provider) use(ctx context.Context, c *provider.Conn) (sid string, release func(), err error) {
	var s credentialsv1.WialonUpstreamSession
	if err := provider.OpenSession(c, &s); err != nil {
		return "", nil, err
	}
	v, _ := p.slots.LoadOrStore(c.SessionKey(), make(chan struct{}, SessionConcurrency))
	slots := v.(chan struct{})
	select {
	case slots <- struct{}{}:
		return s.GetEid(), func() { <-slots }, nil
	case <-ctx.Done():
		return "", nil, ctxError("slot", ctx.Err())
	}
}

// positionProto converts a Wialon fix; nil stays nil.
func positionProto(unitID string, p *Position) *telematicsv1.Position {
	if p == nil {
		return nil
	}
	return &telematicsv1.Position{UnitId: unitID, Time: timestamppb.New(p.Time), Latitude: p.Lat, Longitude: p.Lon,
		AltitudeM: p.Altitude, SpeedKmh: p.Speed, CourseDeg: p.Course, Satellites: int32(p.Satellites)}
}
