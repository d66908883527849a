package wialon

import (
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Name, TokenKind and the limits of Wialon as a provider. The numbers are
// Wialon's documented limits (upstream-facts.md, "Limits").
const (
	Name      = providerName
	TokenKind = "wialon-eid"
	// IdleTimeout is how long Wialon keeps a session nobody uses.
	IdleTimeout = 5 * time.Minute
	// DefaultSessionReuse bounds how long a shared session is reused; the
	// gateway also drops it once it has idled long enough to be dead.
	DefaultSessionReuse = 30 * time.Minute
	// DefaultSessionRequests and DefaultSessionHeavy are Wialon's limits of
	// requests, and of heavy ones (message loads, trips, reports), that one
	// session serves at once; past them it answers error 1003.
	DefaultSessionRequests = 10
	DefaultSessionHeavy    = 3
	// DefaultLeaseTTL is how long a slot of a replica that stopped renewing
	// it (it died) stays taken.
	DefaultLeaseTTL = 15 * time.Second
	// DefaultKeepAlive is how often at least the credentials service logs
	// in with each stored token: Wialon deletes a token unused for 100
	// days.
	DefaultKeepAlive = 30 * 24 * time.Hour
	// DefaultHistoryPage is the most positions one history page holds.
	DefaultHistoryPage = 10000
	// SessionConcurrency is DefaultSessionRequests under its old name.
	SessionConcurrency = DefaultSessionRequests
)

// Names of the session's cross-replica leases (provider.Conn.Lease).
const (
	leaseRequests = "wialon-req"
	leaseHeavy    = "wialon-heavy"
	// leaseLayer serializes use of the session's one message layer
	// (messages/load_interval … unload, and the trips and reports built on
	// it): two loads on one shared session at once, from any replica,
	// would read each other's messages, and Wialon refuses a load beside
	// trips or reports.
	leaseLayer = "wialon-layer"
)

// Services that are heavy, or use the message layer, when the raw
// pass-through is allowed to run them (--wialon-raw-services).
var (
	heavyServices = map[string]bool{"messages/load_interval": true, "messages/load_last": true, "unit/get_trips": true, "report/exec_report": true}
	layerServices = map[string]bool{"messages/load_interval": true, "messages/load_last": true, "messages/get_messages": true,
		"messages/unload": true, "unit/get_trips": true, "report/exec_report": true, "report/cleanup_result": true}
)

// Provider is Wialon behind the provider seam.
type Provider struct {
	client       *Client
	sessionReuse time.Duration
	limits       provider.SessionLimits
	keepAlive    time.Duration
	logins       *loginGuard
	logger       *slog.Logger
	// local bounds concurrency in this process when the gateway lends no
	// cross-replica leases.
	local sync.Map // session key + lease name → chan struct{}
	// layerHold estimates how long one use of the message layer takes (an
	// exponentially weighted mean, ns), so a caller queued for the layer
	// stops waiting while there is still time for its own load.
	layerHold atomic.Int64
}

var (
	_ provider.Provider     = (*Provider)(nil)
	_ provider.HistoryPager = (*Provider)(nil)
	_ provider.KeepAliver   = (*Provider)(nil)
)

// NewProvider is Wialon's provider.Factory.
func NewProvider(env provider.Env) provider.Provider {
	t := env.Tuning
	reuse := t.SessionReuse
	if reuse <= 0 {
		reuse = DefaultSessionReuse
	}
	limits := t.SessionLimits
	if limits.Requests <= 0 {
		limits.Requests = DefaultSessionRequests
	}
	if limits.Heavy <= 0 {
		limits.Heavy = DefaultSessionHeavy
	}
	if limits.LeaseTTL <= 0 {
		limits.LeaseTTL = DefaultLeaseTTL
	}
	keepAlive := t.KeepAlive
	if keepAlive <= 0 {
		keepAlive = DefaultKeepAlive
	}
	raw, ok := t.RawAllow[Name] // --wialon-raw-services
	if !ok {
		raw = DefaultRawServices
	}
	logger := env.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	p := &Provider{client: New(env.HTTPClient(Name), WithRawServices(raw)), sessionReuse: reuse, limits: limits,
		keepAlive: keepAlive, logins: newLoginGuard(env), logger: logger}
	p.layerHold.Store(int64(time.Second))
	return p
}

// Info names Wialon.
func (p *Provider) Info() provider.Info {
	return provider.Info{ID: credentialsv1.Provider_PROVIDER_WIALON, Name: Name, TokenKind: TokenKind,
		DefaultBaseURL: upstream.DefaultWialonBaseURL, IdleTimeout: IdleTimeout}
}

// SecretFromPut picks the access token (and whom to operate as) out of a
// PutCredential request.
func (p *Provider) SecretFromPut(req *credentialsv1.PutCredentialRequest) (proto.Message, string, string, bool) {
	w := req.GetWialon()
	if w == nil {
		return nil, "", "", false
	}
	return &credentialsv1.WialonSecret{Token: w.GetToken(), OperateAs: w.GetOperateAs()}, w.GetBaseUrl(), "wialon.base_url", true
}

// NewSecret returns an empty WialonSecret.
func (p *Provider) NewSecret() proto.Message { return &credentialsv1.WialonSecret{} }

// Describe says nothing: a token has no public account number.
func (p *Provider) Describe(proto.Message) provider.Metadata { return provider.Metadata{} }

// KeepAliveInterval is how often at least the credentials service
// validates each stored token, so Wialon never sees it unused for 100 days.
func (p *Provider) KeepAliveInterval() time.Duration { return p.keepAlive }

// Validate logs in with the token and out again at once, so validation
// leaves no upstream session behind, and returns the user name. The login
// is within the egress IP's login budget; a keep-alive
// (provider.Background(ctx)) leaves half of it to others.
func (p *Provider) Validate(ctx context.Context, baseURL string, secret proto.Message) (string, error) {
	s, err := p.login(ctx, baseURL, secret)
	if err != nil {
		return "", err
	}
	_ = p.client.Logout(ctx, baseURL, s.SID) // best effort: the session idles out anyway
	return s.User, nil
}

// Login opens a session (token/login) within the egress IP's login
// budget. The session message holds the eid, never the token.
func (p *Provider) Login(ctx context.Context, baseURL string, secret proto.Message) (provider.Minted, error) {
	s, err := p.login(ctx, baseURL, secret)
	if err != nil {
		return provider.Minted{}, err
	}
	return provider.Minted{Session: &credentialsv1.WialonUpstreamSession{Eid: s.SID, User: s.User}}, nil
}

func (p *Provider) login(ctx context.Context, baseURL string, secret proto.Message) (Session, error) {
	w, _ := secret.(*credentialsv1.WialonSecret)
	return p.logins.login(ctx, provider.IsBackground(ctx), baseURL, w.GetToken(), func() (Session, error) {
		return p.client.LoginAs(ctx, baseURL, w.GetToken(), w.GetOperateAs())
	})
}

// Check refuses unit ids that are not Wialon item ids, raw calls that are
// not Wialon calls, and raw services not on the allow-list, before any
// login is spent on them.
func (p *Provider) Check(req proto.Message) error {
	switch r := req.(type) {
	case *telematicsv1.GetPositionHistoryRequest:
		if _, err := unitID(r.GetUnitId()); err != nil {
			return err
		}
		if r.GetPageToken() != "" {
			_, err := parsePageToken(r.GetPageToken(), r.GetUnitId(), r.GetStartTime().AsTime(), r.GetEndTime().AsTime())
			return err
		}
	case *telematicsv1.ListTripsRequest:
		_, err := unitID(r.GetUnitId())
		return err
	case *telematicsv1.CallProviderRequest:
		if r.GetWialon() == nil {
			return provider.ErrWrongProvider
		}
		_, err := p.rawCall(r.GetWialon())
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

// rawCall checks a raw call against the allow-list.
func (p *Provider) rawCall(call *telematicsv1.WialonCall) (rawCall, error) {
	params := json.RawMessage("{}")
	if call.GetParams() != nil {
		b, err := call.GetParams().MarshalJSON()
		if err != nil {
			return rawCall{}, &provider.FieldError{Field: "wialon.params", Description: "not representable as JSON"}
		}
		params = b
	}
	return p.client.raw.check(call.GetSvc(), params)
}

// CacheTTL is the configured reuse bound: Wialon gives sessions no expiry,
// only an idle timeout (Info.IdleTimeout, which the gateway applies).
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
	var units []Unit
	err := p.with(ctx, c, use{}, func(sid string) error {
		var err error
		units, err = p.client.SearchUnits(ctx, c.BaseURL, sid)
		return err
	})
	return units, err
}

// History returns every positional message of the unit in [from, to],
// page after page (see HistoryPage).
func (p *Provider) History(ctx context.Context, c *provider.Conn, unit string, from, to time.Time) ([]*telematicsv1.Position, error) {
	var out []*telematicsv1.Position
	req := provider.HistoryPageRequest{UnitID: unit, From: from, To: to}
	for {
		page, err := p.HistoryPage(ctx, c, req)
		out = append(out, page.Positions...)
		if err != nil || page.NextPageToken == "" {
			return out, err
		}
		req.PageToken = page.NextPageToken
	}
}

// HistoryPage loads one page of the unit's positional messages
// (messages/load_interval, then messages/unload), holding the session's
// message layer across replicas. A range with more messages than the page
// holds is not cut silently: the reply carries a token whose page starts
// after the last message returned.
func (p *Provider) HistoryPage(ctx context.Context, c *provider.Conn, req provider.HistoryPageRequest) (provider.HistoryPage, error) {
	id, err := unitID(req.UnitID)
	if err != nil {
		return provider.HistoryPage{}, err
	}
	size := req.PageSize
	if size <= 0 || size > DefaultHistoryPage {
		size = DefaultHistoryPage
	}
	cur := cursor{from: req.From}
	if req.PageToken != "" {
		if cur, err = parsePageToken(req.PageToken, req.UnitID, req.From, req.To); err != nil {
			return provider.HistoryPage{}, err
		}
	}
	var (
		msgs  []Message
		total int
	)
	err = p.with(ctx, c, use{heavy: true, layer: true}, func(sid string) error {
		var err error
		msgs, total, err = p.client.LoadPage(ctx, c.BaseURL, sid, id, cur.from, req.To, size+cur.skip)
		return err
	})
	if err != nil {
		return provider.HistoryPage{}, err
	}
	page := provider.HistoryPage{}
	for i, m := range msgs {
		if i < cur.skip && m.Time.Equal(cur.from) {
			continue // returned by the previous page
		}
		if pos := positionProto(req.UnitID, m.Pos); pos != nil {
			page.Positions = append(page.Positions, pos)
		}
	}
	// Wialon's count says whether the range holds more. Should it count
	// only what was returned (unverified which), a full page is taken to
	// mean there may be more: at worst one empty page follows.
	if len(msgs) > 0 && (total > len(msgs) || len(msgs) >= size+cur.skip) {
		page.NextPageToken = nextPageToken(msgs, cur, req.UnitID, req.From, req.To)
	}
	return page, nil
}

// Trips returns the unit's trips (unit/get_trips on the loaded interval),
// holding the session's message layer across replicas.
func (p *Provider) Trips(ctx context.Context, c *provider.Conn, unit string, from, to time.Time) ([]*telematicsv1.Trip, error) {
	id, err := unitID(unit)
	if err != nil {
		return nil, err
	}
	var out []*telematicsv1.Trip
	err = p.with(ctx, c, use{heavy: true, layer: true}, func(sid string) error {
		trips, err := p.client.Trips(ctx, c.BaseURL, sid, id, from, to)
		for _, t := range trips {
			out = append(out, provider.NewTrip(unit, t.From, t.To, t.DistanceMeters))
		}
		return err
	})
	return out, err
}

// RawTarget implements provider.Gateway: the Wialon svc.
func (p *Provider) RawTarget(req *telematicsv1.CallProviderRequest) string {
	return req.GetWialon().GetSvc()
}

// Raw passes an allowed service through (raw.go) and returns Wialon's
// reply with the session id cut out.
func (p *Provider) Raw(ctx context.Context, c *provider.Conn, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	call := req.GetWialon()
	if call == nil {
		return nil, provider.ErrWrongProvider
	}
	checked, err := p.rawCall(call)
	if err != nil {
		return nil, err
	}
	var u use
	for _, svc := range checked.services {
		u.heavy = u.heavy || heavyServices[svc]
		u.layer = u.layer || layerServices[svc]
	}
	var reply json.RawMessage
	err = p.with(ctx, c, u, func(sid string) error {
		var err error
		reply, err = p.client.sendRaw(ctx, c.BaseURL, sid, checked)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &telematicsv1.CallProviderResponse{HttpStatus: 200, Json: string(reply)}, nil
}

// Logout ends the session (core/logout), within its request limit.
func (p *Provider) Logout(ctx context.Context, c *provider.Conn) error {
	return p.with(ctx, c, use{}, func(sid string) error {
		return p.client.Logout(ctx, c.BaseURL, sid)
	})
}

// use says what a request needs of its session besides one request slot.
type use struct {
	heavy bool // one of the heavy slots
	layer bool // the message layer, alone
}

// with runs f with c's session id holding what u needs of the session,
// across replicas, in a fixed order — the layer, a heavy slot, a request
// slot — so no two callers wait for each other in a circle.
//
// The layer is queued for first come, first served: a caller stops
// waiting for it early enough to still run its own use (the estimate of
// one use, twice over) and is answered RESOURCE_EXHAUSTED with how long
// the queue ahead is likely to take, instead of running out its deadline.
func (p *Provider) with(ctx context.Context, c *provider.Conn, u use, f func(sid string) error) error {
	var s credentialsv1.WialonUpstreamSession
	if err := provider.OpenSession(c, &s); err != nil {
		return err
	}
	if u.layer {
		release, err := p.waitLayer(ctx, c)
		if err != nil {
			return err
		}
		defer release()
		start := time.Now()
		defer func() { p.observeLayer(time.Since(start)) }()
	}
	if u.heavy {
		release, err := p.lease(ctx, c, leaseHeavy, p.limits.Heavy)
		if err != nil {
			return err
		}
		defer release()
	}
	release, err := p.lease(ctx, c, leaseRequests, p.limits.Requests)
	if err != nil {
		return err
	}
	defer release()
	return f(s.GetEid())
}

// waitLayer queues for the session's message layer.
func (p *Provider) waitLayer(ctx context.Context, c *provider.Conn) (func(), error) {
	hold := time.Duration(p.layerHold.Load())
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if d, ok := ctx.Deadline(); ok {
		// A free layer is taken even when the estimate says the deadline
		// is too close: the estimate is of a queue, not of this use.
		stop := d.Add(-2 * hold)
		if first := time.Now().Add(min(layerFirstTry, time.Until(d)/2)); stop.Before(first) {
			stop = first
		}
		wctx, cancel = context.WithDeadline(ctx, stop)
	}
	defer cancel()
	release, err := p.lease(wctx, c, leaseLayer, 1)
	if err != nil && ctx.Err() == nil && wctx.Err() != nil {
		return nil, &upstream.Error{Kind: upstream.KindRateLimited, Provider: providerName, Op: "messages/load_interval", RetryAfter: 2 * hold,
			Reason: "the shared Wialon session's message layer is busy with other loads, and this call's deadline leaves no time to wait for its turn"}
	}
	return release, err
}

// layerFirstTry is the least a caller waits for the layer, however close
// its deadline: time to be granted a free layer.
const layerFirstTry = 100 * time.Millisecond

// observeLayer folds one use of the layer into the estimate (weight 1/8).
func (p *Provider) observeLayer(d time.Duration) {
	for {
		old := p.layerHold.Load()
		next := old + (int64(d)-old)/8
		if p.layerHold.CompareAndSwap(old, max(next, int64(10*time.Millisecond))) {
			return
		}
	}
}

// lease takes one of limit slots named name of c's session: across
// replicas through c.Lease, else in this process.
func (p *Provider) lease(ctx context.Context, c *provider.Conn, name string, limit int) (func(), error) {
	if c.Lease != nil {
		release, err := c.Lease(ctx, name, limit, p.limits.LeaseTTL)
		if err != nil && ctx.Err() != nil {
			return nil, ctxError(name, ctx.Err())
		}
		return release, err
	}
	v, _ := p.local.LoadOrStore(c.SessionKey()+"\x00"+name, make(chan struct{}, limit))
	slots := v.(chan struct{})
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	case <-ctx.Done():
		return nil, ctxError(name, ctx.Err())
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
