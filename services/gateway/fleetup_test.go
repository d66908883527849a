package gateway_test

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// The FleetUp tests below run through the gateway's RPCs against the
// simulator, which holds FleetUp's real trip shape and 30-day cap, its JWT
// expiry and its 429s (shared/reference/upstream-facts.md).

// withAccountLimit is FleetUp with a request budget of its own: burst slots
// and then one an hour, so a test counts slots without waiting for any.
func withAccountLimit(burst int) []provider.Factory {
	return []provider.Factory{wialon.NewProvider, func(env provider.Env) provider.Provider {
		env.Tuning.AccountLimit = provider.Limit{Rate: 1, Period: time.Hour, Burst: burst}
		return fleetup.NewProvider(env)
	}}
}

// putFleetUpFor stores a FleetUp credential for tenant, unchecked when the
// secret is not the simulator's.
func (st *stack) putFleetUpFor(t *testing.T, tenantID, id, baseURL string, secret *credentialsv1.FleetUpSecret, skipValidation bool) {
	t.Helper()
	secret.BaseUrl = baseURL
	_, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenantID, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: secret}, SkipValidation: skipValidation})
	if err != nil {
		t.Fatal(err)
	}
}

// issueFor returns a context carrying a fresh handle of tenant's credential.
func (st *stack) issueFor(t *testing.T, tenantID, id string, scopes ...credentialsv1.Scope) context.Context {
	t.Helper()
	resp, err := st.sessions.IssueSession(context.Background(), &credentialsv1.IssueSessionRequest{TenantId: tenantID, CredentialId: id, Scopes: scopes})
	if err != nil {
		t.Fatal(err)
	}
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+resp.GetHandle())
}

// FleetUp trips come out in metres and with their positions: each trip
// ListTrips returns is the /trips/history record FleetUp sent, read by the
// units upstream-facts.md gives (tripMileage in metres, "lat,lng" in
// milliarcseconds, YYYYMMDDHHMMSS UTC) — the raw record fetched through
// CallProvider and decoded here, independently of the client.
func TestFleetUpTripsAreInMetresWithPositions(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f", credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
	gw := st.gateways[0]
	const unit = "SIM000004"
	end := time.Now().Truncate(time.Second)
	start := end.Add(-48 * time.Hour)
	resp, err := gw.ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: unit, StartTime: timestamppb.New(start), EndTime: timestamppb.New(end)})
	if err != nil {
		t.Fatal(err)
	}

	body, err := structpb.NewStruct(map[string]any{"devId": unit,
		"startDate": start.UTC().AddDate(0, 0, -1).Format("20060102"), "endDate": end.UTC().Format("20060102")})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := gw.CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Fleetup{
		Fleetup: &telematicsv1.FleetUpCall{Method: "POST", Path: "/trips/history", Body: body}}})
	if err != nil {
		t.Fatal(err)
	}
	var reply struct {
		Trips []struct {
			StartTime, EndTime         string
			StartLocation, EndLocation string
			TripMileage                float64
			FuelWear                   float64
		}
	}
	if err := json.Unmarshal([]byte(raw.GetJson()), &reply); err != nil {
		t.Fatalf("raw /trips/history: %v", err)
	}
	type want struct {
		distance, fuel                     float64
		startLat, startLon, endLat, endLon float64
		end                                time.Time
	}
	byStart := map[time.Time]want{}
	for _, r := range reply.Trips {
		from, err1 := time.Parse("20060102150405", r.StartTime)
		to, err2 := time.Parse("20060102150405", r.EndTime)
		if err1 != nil || err2 != nil {
			t.Fatalf("raw trip times %q %q", r.StartTime, r.EndTime)
		}
		if to.Before(start) || from.After(end) {
			continue
		}
		w := want{distance: r.TripMileage, fuel: r.FuelWear / 100, end: to}
		w.startLat, w.startLon = masPair(t, r.StartLocation)
		w.endLat, w.endLon = masPair(t, r.EndLocation)
		byStart[from] = w
	}
	if len(resp.GetTrips()) != len(byStart) || len(byStart) < 40 {
		t.Fatalf("ListTrips gave %d trips, FleetUp has %d in the range", len(resp.GetTrips()), len(byStart))
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	for _, tr := range resp.GetTrips() {
		w, ok := byStart[tr.GetStartTime().AsTime()]
		if !ok {
			t.Fatalf("trip at %v is not one FleetUp reported", tr.GetStartTime().AsTime())
		}
		if tr.GetDistanceM() != w.distance || tr.GetDistanceM() < 1000 || tr.GetDistanceM() > 100_000 {
			t.Errorf("trip at %v: distance_m %v, want tripMileage %v metres", tr.GetStartTime().AsTime(), tr.GetDistanceM(), w.distance)
		}
		sp, ep := tr.GetStartPosition(), tr.GetEndPosition()
		if sp == nil || ep == nil {
			t.Fatalf("trip at %v lost its positions", tr.GetStartTime().AsTime())
		}
		if !near(sp.GetLatitude(), w.startLat) || !near(sp.GetLongitude(), w.startLon) || !near(ep.GetLatitude(), w.endLat) || !near(ep.GetLongitude(), w.endLon) {
			t.Errorf("trip at %v: positions %v,%v → %v,%v; want %v,%v → %v,%v (milliarcseconds / 3,600,000)", tr.GetStartTime().AsTime(),
				sp.GetLatitude(), sp.GetLongitude(), ep.GetLatitude(), ep.GetLongitude(), w.startLat, w.startLon, w.endLat, w.endLon)
		}
		if tr.FuelUsedL == nil || !near(tr.GetFuelUsedL(), w.fuel) {
			t.Errorf("trip at %v: fuel_used_l %v, want fuelWear %v l", tr.GetStartTime().AsTime(), tr.FuelUsedL, w.fuel)
		}
		if !tr.GetEndTime().AsTime().Equal(w.end) {
			t.Errorf("trip at %v ends %v, want %v", tr.GetStartTime().AsTime(), tr.GetEndTime().AsTime(), w.end)
		}
	}
}

func masPair(t *testing.T, s string) (lat, lon float64) {
	t.Helper()
	a, b, ok := strings.Cut(s, ",")
	la, err1 := strconv.ParseFloat(a, 64)
	lo, err2 := strconv.ParseFloat(b, 64)
	if !ok || err1 != nil || err2 != nil {
		t.Fatalf("location %q is not \"lat,lng\"", s)
	}
	return la / 3_600_000, lo / 3_600_000
}

// A 31-day trips query succeeds although FleetUp refuses any range over 30
// days with 400: the client asks in windows of at most 30 days.
func TestFleetUp31DayTrips(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	before := st.sim.Stats().Requests["fleetup POST /trips/history"]
	end := time.Now()
	start := end.AddDate(0, 0, -31)
	resp, err := st.gateways[0].ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: "SIM000007", StartTime: timestamppb.New(start), EndTime: timestamppb.New(end)})
	if err != nil {
		t.Fatalf("31 days of trips: %v", err)
	}
	// One 40-minute trip an hour.
	if n := len(resp.GetTrips()); n < 31*24-2 || n > 31*24+1 {
		t.Errorf("%d trips in 31 days, want about %d", n, 31*24)
	}
	if got := st.sim.Stats().Requests["fleetup POST /trips/history"] - before; got != 2 {
		t.Errorf("%d /trips/history requests, want 2 windows", got)
	}
}

// A 401 or 403 on a JWT FleetUp minted moments ago means the endpoint is not
// allowed for the account (FleetUp: enterprise accounts on JWT may use only
// /devices and /gpsdata/*). It is PERMISSION_DENIED, and never a reason to
// mint again: however often the caller retries, the mint count stays put,
// and the other endpoints keep working with the same JWT.
func TestFleetUpRefusedEndpointMintsNoMore(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
		age    time.Duration // how long ago FleetUp minted the JWT, by its clock
	}{
		{"401 on a fresh JWT", http.StatusUnauthorized, 0},
		{"401 on a JWT minted 10 minutes ago", http.StatusUnauthorized, 10 * time.Minute},
		{"403", http.StatusForbidden, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st := newStack(t, stackOptions{replicas: 2})
			st.putFleetUp(t, "f")
			ctx, _ := st.issue(t, "f")
			if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
				t.Fatal(err)
			}
			st.sim.RestrictFleetUpAccount(canaryAccount, tt.status)
			st.simClock.Store(int64(tt.age))
			mints := st.sim.Stats().FleetUpMints
			for i := range 6 {
				_, err := st.gateways[i%2].ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: "SIM000001",
					StartTime: timestamppb.New(time.Now().Add(-time.Hour)), EndTime: timestamppb.Now()})
				wantCode(t, err, codes.PermissionDenied)
			}
			if _, err := st.gateways[1].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Fatalf("an allowed endpoint after the refusals: %v", err)
			}
			if got := st.sim.Stats().FleetUpMints - mints; got != 0 {
				t.Errorf("6 refused calls caused %d mints, want 0", got)
			}
		})
	}
}

// Every upstream HTTP request takes one slot of the account's budget: a
// ListUnits is two requests, a 36-hour history two windows. With a budget
// of four slots both succeed and the next call is refused without reaching
// FleetUp. The mint is charged to the credential, not to the account.
func TestFleetUpOneBudgetSlotPerUpstreamRequest(t *testing.T) {
	st := newStack(t, stackOptions{providers: withAccountLimit(4)})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	gw := st.gateways[0]
	calls := func() int64 { return st.sim.Stats().FleetUpCallsByAccount[canaryAccount] }
	before := calls()
	if _, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	end := time.Now()
	if _, err := gw.GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "SIM000002",
		StartTime: timestamppb.New(end.Add(-36 * time.Hour)), EndTime: timestamppb.New(end)}); err != nil {
		t.Fatal(err)
	}
	if got := calls() - before; got != 4 {
		t.Fatalf("%d FleetUp requests, want 4 (devices, last locations, two history windows)", got)
	}
	_, err := gw.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{})
	s := wantCode(t, err, codes.ResourceExhausted)
	if retryDelay(s) <= 0 {
		t.Errorf("RESOURCE_EXHAUSTED without a RetryInfo: %v", s.Details())
	}
	if got := calls() - before; got != 4 {
		t.Errorf("the refused call reached FleetUp: %d requests", got)
	}
}

func retryDelay(s *status.Status) time.Duration {
	for _, d := range s.Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			return r.GetRetryDelay().AsDuration()
		}
	}
	return 0
}

// timedUpstream records when each FleetUp request came and how it was
// answered.
type timedUpstream struct {
	next http.Handler
	mu   sync.Mutex
	log  []timedRequest
}

type timedRequest struct {
	at, answered time.Time
	path         string
	status       int
	retryAfter   time.Duration
}

func (u *timedUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	at := time.Now()
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	u.next.ServeHTTP(rec, r)
	secs, _ := strconv.Atoi(w.Header().Get("Retry-After"))
	u.mu.Lock()
	u.log = append(u.log, timedRequest{at: at, answered: time.Now(), path: r.URL.Path, status: rec.status, retryAfter: time.Duration(secs) * time.Second})
	u.mu.Unlock()
}

func (u *timedUpstream) requests() []timedRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]timedRequest(nil), u.log...)
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// FleetUp's 429 Retry-After is honoured by every replica: once FleetUp has
// said "wait", no replica sends the account's next request before the wait
// is over, and the call that was refused is tried again after it (bounded,
// with the rest reported as RESOURCE_EXHAUSTED with RetryInfo).
func TestFleetUpRetryAfterIsHonoured(t *testing.T) {
	sim := simulator.New(simulator.Config{Units: 5})
	sim.AddFleetUpAccount(canaryAPIKey, canaryAccount, canarySecret)
	up := &timedUpstream{next: sim.Handler()}
	url, _ := serveUpstream(t, up)
	st := newStack(t, stackOptions{replicas: 2, extraAllowed: []string{strings.TrimPrefix(url, "http://")}})
	st.putFleetUpFor(t, tenant, "f", url, &credentialsv1.FleetUpSecret{ApiKey: canaryAPIKey, AccountId: canaryAccount, Secret: canarySecret}, false)
	ctx, _ := st.issue(t, "f")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}

	t.Run("one caller", func(t *testing.T) {
		sim.SetFleetUpAccountRate(0.5, 1) // Retry-After: 2
		for range 2 {
			if _, err := st.gateways[0].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Fatalf("a call that met a 429 should succeed after its Retry-After: %v", err)
			}
		}
		checkWaits(t, up.requests(), 1)
	})

	t.Run("two replicas", func(t *testing.T) {
		sim.SetFleetUpAccountRate(1, 1) // Retry-After: 1
		mark := len(up.requests())
		start := time.Now()
		var wg sync.WaitGroup
		var mu sync.Mutex
		ok := 0
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Since(start) < 4*time.Second {
					_, err := st.gateways[i].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{})
					if err == nil {
						mu.Lock()
						ok++
						mu.Unlock()
						continue
					}
					if s, _ := status.FromError(err); s.Code() != codes.ResourceExhausted || retryDelay(s) <= 0 {
						t.Errorf("replica %d: %v, want success or RESOURCE_EXHAUSTED with RetryInfo", i, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		if ok < 2 {
			t.Errorf("only %d calls succeeded in 4 s at FleetUp's 1/s", ok)
		}
		checkWaits(t, up.requests()[mark:], 1)
	})
}

// checkWaits fails if a request was sent after FleetUp answered a 429 and
// before that 429's Retry-After had passed, and if fewer than min 429s were
// seen (the test proved nothing). A request already under way when the
// 429 was answered could not know of it: inFlight covers the time the
// gateway takes to read the 429 and hold the budget.
func checkWaits(t *testing.T, reqs []timedRequest, min int) {
	t.Helper()
	const inFlight = 100 * time.Millisecond
	// The shared hold runs on Redis's clock, the log on this one: the same
	// machine, so a small tolerance covers the two reads of it.
	const tolerance = 50 * time.Millisecond
	limited, early := 0, 0
	for _, l := range reqs {
		if l.status != http.StatusTooManyRequests {
			continue
		}
		limited++
		for _, r := range reqs {
			if r.at.After(l.answered.Add(inFlight)) && r.at.Before(l.at.Add(l.retryAfter-tolerance)) {
				if early++; early <= 3 {
					t.Errorf("%s was sent %v after a 429 with Retry-After %v", r.path, r.at.Sub(l.at), l.retryAfter)
				}
			}
		}
	}
	if early > 3 {
		t.Errorf("… %d requests in all were sent before a Retry-After had passed", early)
	}
	if limited < min {
		t.Errorf("%d 429s in %d requests, want at least %d", limited, len(reqs), min)
	}
}

// Finding 7: budgets keyed by unverified input. A tenant that stores a bogus
// FleetUp secret naming another tenant's account id must not spend that
// account's budget: before a mint has proven the account, requests are
// charged to the caller's own tenant and credential.
func TestFleetUpBudgetIsNotKeyedByAnUnprovenAccount(t *testing.T) {
	st := newStack(t, stackOptions{providers: withAccountLimit(3)})
	st.putFleetUp(t, "f") // the victim's real credential, account canaryAccount
	victim, _ := st.issue(t, "f")
	st.putFleetUpFor(t, "mallory", "bogus", st.simURL,
		&credentialsv1.FleetUpSecret{ApiKey: canaryAPIKey, AccountId: canaryAccount, Secret: "not-the-secret"}, true)
	attacker := st.issueFor(t, "mallory", "bogus")
	for range 5 {
		_, err := st.gateways[0].ListUnits(attacker, &telematicsv1.ListUnitsRequest{})
		if code := status.Code(err); code != codes.FailedPrecondition && code != codes.ResourceExhausted {
			t.Fatalf("the bogus credential's call: %v", err)
		}
	}
	if _, err := st.gateways[0].ListUnits(victim, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatalf("the victim's account budget was spent by another tenant's unproven credential: %v", err)
	}
	// Two credentials of one proven account share its budget (FleetUp
	// paces per account): the victim's second credential has the one slot
	// left, then none.
	st.putFleetUp(t, "f2")
	second, _ := st.issue(t, "f2")
	if _, err := st.gateways[0].GetLatestPositions(second, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
		t.Fatal(err)
	}
	_, err := st.gateways[0].GetLatestPositions(second, &telematicsv1.GetLatestPositionsRequest{})
	wantCode(t, err, codes.ResourceExhausted)
}
