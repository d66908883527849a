package gateway_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// fleetfake is a third provider that exists only in this test. It is
// registered through the same seam as Wialon and FleetUp and has no proto
// of its own: its enum value is one the contract does not name, its
// secret and session are well-known wrapper messages, and it has no
// CallProvider case. Everything else it needs — custody in the credentials
// service, shared sessions, pacing, locks, purge — comes from the seam.
const (
	fakeID     = credentialsv1.Provider(99)
	fakeName   = "fleetfake"
	fakeSecret = "fleetfake-canary-secret-3e9a"
	fakeOther  = "fleetfake-rotated-secret-77b0"
)

var fakeUnitTime = time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)

type fakeProvider struct{ hc *http.Client }

func newFakeProvider(env provider.Env) provider.Provider {
	return &fakeProvider{hc: env.HTTPClient(fakeName)}
}

func (f *fakeProvider) Info() provider.Info {
	return provider.Info{ID: fakeID, Name: fakeName, TokenKind: fakeName + "-session", DefaultBaseURL: "https://fleetfake.invalid"}
}

func (f *fakeProvider) SecretFromPut(*credentialsv1.PutCredentialRequest) (proto.Message, string, string, bool) {
	return nil, "", "", false // no oneof case in the contract
}
func (f *fakeProvider) NewSecret() proto.Message                 { return &wrapperspb.StringValue{} }
func (f *fakeProvider) Describe(proto.Message) provider.Metadata { return provider.Metadata{} }
func (f *fakeProvider) CacheTTL(*credentialsv1.MintUpstreamSessionResponse) time.Duration {
	return time.Minute
}

func (f *fakeProvider) Validate(ctx context.Context, baseURL string, secret proto.Message) (string, error) {
	m, err := f.Login(ctx, baseURL, secret)
	if err != nil {
		return "", err
	}
	return "fake-user", f.post(ctx, baseURL, "/logout", m.Session.(*wrapperspb.StringValue).GetValue(), nil, nil)
}

func (f *fakeProvider) Login(ctx context.Context, baseURL string, secret proto.Message) (provider.Minted, error) {
	var out struct{ Session string }
	body := map[string]string{"secret": secret.(*wrapperspb.StringValue).GetValue()}
	if err := f.post(ctx, baseURL, "/login", "", body, &out); err != nil {
		return provider.Minted{}, err
	}
	return provider.Minted{Session: wrapperspb.String(out.Session)}, nil
}

func (f *fakeProvider) Check(req proto.Message) error {
	switch r := req.(type) {
	case *telematicsv1.CallProviderRequest:
		return provider.ErrWrongProvider
	case *telematicsv1.ListTripsRequest:
		if !strings.HasPrefix(r.GetUnitId(), "u") {
			return &provider.FieldError{Field: "unit_id", Description: "a fleetfake unit id starts with u"}
		}
	}
	return nil
}

func (f *fakeProvider) BeforeMint(ctx context.Context, c *provider.Conn) error {
	return c.Pace(ctx, fakeName+":"+c.Tenant+"/"+c.Credential, provider.Limit{Rate: 1000, Period: time.Second, Burst: 1000})
}

type fakeUnit struct {
	ID, Name string
	Lat, Lon float64
}

func (f *fakeProvider) fetchUnits(ctx context.Context, c *provider.Conn) ([]fakeUnit, error) {
	var s wrapperspb.StringValue
	if err := provider.OpenSession(c, &s); err != nil {
		return nil, err
	}
	var out struct{ Units []fakeUnit }
	err := f.post(ctx, c.BaseURL, "/units", s.GetValue(), nil, &out)
	return out.Units, err
}

func (f *fakeProvider) position(u fakeUnit) *telematicsv1.Position {
	return &telematicsv1.Position{UnitId: u.ID, Time: timestamppb.New(fakeUnitTime), Latitude: u.Lat, Longitude: u.Lon}
}

func (f *fakeProvider) Units(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Unit, error) {
	units, err := f.fetchUnits(ctx, c)
	var out []*telematicsv1.Unit
	for _, u := range units {
		out = append(out, &telematicsv1.Unit{UnitId: u.ID, Name: u.Name, Provider: telematicsv1.Provider(fakeID), LastPosition: f.position(u)})
	}
	return out, err
}

func (f *fakeProvider) LatestPositions(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Position, error) {
	units, err := f.fetchUnits(ctx, c)
	var out []*telematicsv1.Position
	for _, u := range units {
		out = append(out, f.position(u))
	}
	return out, err
}

func (f *fakeProvider) History(ctx context.Context, c *provider.Conn, unitID string, from, to time.Time) ([]*telematicsv1.Position, error) {
	release, err := c.Lock(ctx, "reader") // a per-session lock across replicas, as Wialon's loader
	if err != nil {
		return nil, err
	}
	defer release()
	units, err := f.fetchUnits(ctx, c)
	for _, u := range units {
		if u.ID == unitID {
			return []*telematicsv1.Position{f.position(u)}, err
		}
	}
	return nil, err
}

func (f *fakeProvider) Trips(ctx context.Context, c *provider.Conn, unitID string, from, to time.Time) ([]*telematicsv1.Trip, error) {
	units, err := f.fetchUnits(ctx, c)
	var out []*telematicsv1.Trip
	for _, u := range units {
		if u.ID == unitID {
			out = append(out, provider.NewTrip(unitID, provider.TripEnd{Time: from}, provider.TripEnd{Time: to, Lat: u.Lat, Lon: u.Lon}, 1500))
		}
	}
	return out, err
}

func (f *fakeProvider) RawTarget(*telematicsv1.CallProviderRequest) string { return "fake" }

func (f *fakeProvider) Raw(context.Context, *provider.Conn, *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	return nil, provider.ErrWrongProvider
}

func (f *fakeProvider) Logout(ctx context.Context, c *provider.Conn) error {
	var s wrapperspb.StringValue
	if err := provider.OpenSession(c, &s); err != nil {
		return err
	}
	return f.post(ctx, c.BaseURL, "/logout", s.GetValue(), nil, nil)
}

// post calls the fake upstream; 401 means a lost session, or a bad secret
// at /login.
func (f *fakeProvider) post(ctx context.Context, baseURL, path, session string, body, out any) error {
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("X-Session", session)
	resp, err := f.hc.Do(req)
	if err != nil {
		return upstream.TransportError(ctx, fakeName, path, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusUnauthorized && path == "/login":
		return &upstream.Error{Kind: upstream.KindRejected, Provider: fakeName, Op: path, Code: resp.StatusCode}
	case resp.StatusCode == http.StatusUnauthorized:
		return &upstream.Error{Kind: upstream.KindSessionInvalid, Provider: fakeName, Op: path, Code: resp.StatusCode}
	case resp.StatusCode != http.StatusOK:
		return &upstream.Error{Kind: upstream.KindUnavailable, Provider: fakeName, Op: path, Code: resp.StatusCode}
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// fakeUpstream is fleetfake's server (what the simulator is for Wialon
// and FleetUp).
type fakeUpstream struct {
	url string

	mu       sync.Mutex
	secrets  map[string]bool
	sessions map[string]bool
	logins   int
	logouts  int
	// secretSeen counts requests other than /login whose body held a secret.
	secretSeen int
}

func newFakeUpstream(t *testing.T) *fakeUpstream {
	u := &fakeUpstream{secrets: map[string]bool{fakeSecret: true, fakeOther: true}, sessions: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(srv.Close)
	u.url = srv.URL
	return u
}

func (u *fakeUpstream) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	u.mu.Lock()
	defer u.mu.Unlock()
	if r.URL.Path != "/login" && (bytes.Contains(body, []byte(fakeSecret)) || bytes.Contains(body, []byte(fakeOther))) {
		u.secretSeen++
	}
	switch r.URL.Path {
	case "/login":
		var in struct{ Secret string }
		if json.Unmarshal(body, &in) != nil || !u.secrets[in.Secret] {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		sid := "fs-" + hex.EncodeToString(b)
		u.sessions[sid] = true
		u.logins++
		_ = json.NewEncoder(w).Encode(map[string]string{"session": sid})
		return
	}
	sid := r.Header.Get("X-Session")
	if !u.sessions[sid] {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	switch r.URL.Path {
	case "/logout":
		delete(u.sessions, sid)
		u.logouts++
	case "/units":
		_ = json.NewEncoder(w).Encode(map[string]any{"units": []fakeUnit{
			{ID: "u1", Name: "Truck 1", Lat: 10.5, Lon: 20.25},
			{ID: "u2", Name: "Van 2", Lat: -33.75, Lon: 151.125},
		}})
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}

func (u *fakeUpstream) counts() (logins, logouts, open, secretSeen int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.logins, u.logouts, len(u.sessions), u.secretSeen
}

func (u *fakeUpstream) expireSessions() {
	u.mu.Lock()
	defer u.mu.Unlock()
	clear(u.sessions)
}

// TestAThirdProviderNeedsOnlyTheSeam registers fleetfake through the seam
// and drives it through the gateway's public RPCs on two replicas: the
// services need nothing else to serve a new provider.
func TestAThirdProviderNeedsOnlyTheSeam(t *testing.T) {
	up := newFakeUpstream(t)
	st := newStack(t, stackOptions{replicas: 2, providers: append(providers.All(), newFakeProvider),
		extraAllowed: []string{strings.TrimPrefix(up.url, "http://")}})
	bg := context.Background()
	put, err := st.credSvc.PutSecret(bg, credentials.SecretPut{TenantID: tenant, CredentialID: "fk", Provider: fakeID,
		Secret: wrapperspb.String(fakeSecret), BaseURL: up.url})
	if err != nil {
		t.Fatal(err)
	}
	if c := put.GetCredential(); c.GetProvider() != fakeID || c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID || c.GetUpstreamUser() != "fake-user" {
		t.Fatalf("stored fleetfake credential = %v", c)
	}
	ctx, _ := st.issue(t, "fk", credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)

	u1 := &telematicsv1.Position{UnitId: "u1", Time: timestamppb.New(fakeUnitTime), Latitude: 10.5, Longitude: 20.25}
	u2 := &telematicsv1.Position{UnitId: "u2", Time: timestamppb.New(fakeUnitTime), Latitude: -33.75, Longitude: 151.125}
	units, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "ListUnits", units, &telematicsv1.ListUnitsResponse{Units: []*telematicsv1.Unit{
		{UnitId: "u1", Name: "Truck 1", Provider: telematicsv1.Provider(fakeID), LastPosition: u1},
		{UnitId: "u2", Name: "Van 2", Provider: telematicsv1.Provider(fakeID), LastPosition: u2},
	}})
	latest, err := st.gateways[1].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{UnitIds: []string{"u2"}})
	if err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "GetLatestPositions", latest, &telematicsv1.GetLatestPositionsResponse{Positions: []*telematicsv1.Position{u2}})
	from, to := fakeUnitTime.Add(-time.Hour), fakeUnitTime
	hist, err := st.gateways[1].GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "u1", StartTime: timestamppb.New(from), EndTime: timestamppb.New(to)})
	if err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "GetPositionHistory", hist, &telematicsv1.GetPositionHistoryResponse{Positions: []*telematicsv1.Position{u1}})
	trips, err := st.gateways[0].ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: "u1", StartTime: timestamppb.New(from), EndTime: timestamppb.New(to)})
	if err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "ListTrips", trips, &telematicsv1.ListTripsResponse{Trips: []*telematicsv1.Trip{{UnitId: "u1",
		StartTime: timestamppb.New(from), EndTime: timestamppb.New(to), DistanceM: 1500,
		EndPosition: &telematicsv1.Position{UnitId: "u1", Time: timestamppb.New(to), Latitude: 10.5, Longitude: 20.25}}}})
	wctx, cancel := context.WithCancel(ctx)
	stream, err := st.gateways[1].WatchPositions(wctx, &telematicsv1.WatchPositionsRequest{MinInterval: durationpb.New(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "WatchPositions", first, &telematicsv1.WatchPositionsResponse{Positions: []*telematicsv1.Position{u1, u2}})

	// Refused before any upstream work, as the provider says.
	_, err = st.gateways[0].ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: "x1", StartTime: timestamppb.New(from), EndTime: timestamppb.New(to)})
	wantCode(t, err, codes.InvalidArgument)
	_, err = st.gateways[0].CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{Wialon: &telematicsv1.WialonCall{Svc: "core/search_items"}}})
	wantCode(t, err, codes.FailedPrecondition)

	// One login for validation (logged out again) and one shared by every
	// call on both replicas; the secret went only to /login.
	logins, logouts, open, secretSeen := up.counts()
	if logins != 2 || logouts != 1 || open != 1 || secretSeen != 0 {
		t.Fatalf("fleetfake saw %d logins, %d logouts, %d open sessions, %d non-login requests with the secret; want 2, 1, 1, 0",
			logins, logouts, open, secretSeen)
	}

	// A lost session is minted again once, for both replicas.
	up.expireSessions()
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := st.gateways[i%2].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if l, _, _, _ := up.counts(); l != 3 {
		t.Fatalf("a lost fleetfake session caused %d logins, want 1", l-logins)
	}

	// Rotation: the next call mints with the new secret and purges — logs
	// out — the old secret's session.
	if _, err := st.credSvc.PutSecret(bg, credentials.SecretPut{TenantID: tenant, CredentialID: "fk", Provider: fakeID,
		Secret: wrapperspb.String(fakeOther), BaseURL: up.url, SkipValidation: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	if logins, logouts, open, secretSeen := up.counts(); logins != 4 || logouts != 2 || open != 1 || secretSeen != 0 {
		t.Fatalf("after a rotation fleetfake saw %d logins, %d logouts, %d open, %d leaks; want 4, 2, 1, 0", logins, logouts, open, secretSeen)
	}

	dump, logs := st.dumpRedis(t), st.logs.String()
	for _, canary := range []string{fakeSecret, fakeOther} {
		if strings.Contains(dump, canary) || strings.Contains(logs, canary) {
			t.Errorf("fleetfake secret %.10s… found in Redis or logs", canary)
		}
	}
}

func wantEqual(t *testing.T, what string, got, want proto.Message) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Fatalf("%s =\n%v\nwant\n%v", what, got, want)
	}
}
