package gateway_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// The Wialon items of issue 10, through the gateway's RPCs, against a
// simulator that enforces Wialon's limits (services/simulator,
// wialon_limits.go).

// noLimitErrors fails the test if the simulator answered any request 1003
// for a session limit, or saw more at once than Wialon allows.
func noLimitErrors(t *testing.T, st simulator.Stats) {
	t.Helper()
	if len(st.WialonLimitErrors) != 0 || st.Faults["rate_limit"] != 0 {
		t.Errorf("Wialon answered 1003: %v", st.WialonLimitErrors)
	}
	if st.WialonPeakRequests > 10 || st.WialonPeakHeavy > 3 {
		t.Errorf("one session served %d requests and %d heavy ones at once; Wialon allows 10 and 3", st.WialonPeakRequests, st.WialonPeakHeavy)
	}
	if st.WialonIPBlocks != 0 {
		t.Errorf("Wialon blocked the IP %d times", st.WialonIPBlocks)
	}
}

// TestFortyHistoryLoadsShareOneSessionAcrossReplicas: 40 history loads at
// once, spread over three gateway replicas, all through one shared Wialon
// session. The session's one message layer is queued for across replicas,
// first come first served, so Wialon never sees two loads at once or more
// than its limits, and every call is answered within its deadline.
func TestFortyHistoryLoadsShareOneSessionAcrossReplicas(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 3, sim: simulator.Config{Latency: 20 * time.Millisecond}})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err) // the one shared session
	}
	before := st.sim.Stats()

	const calls = 40
	const deadline = 20 * time.Second
	to := time.Now().Truncate(time.Minute)
	req := &telematicsv1.GetPositionHistoryRequest{UnitId: "10001", StartTime: timestamppb.New(to.Add(-time.Hour)), EndTime: timestamppb.New(to)}
	replies := make([]*telematicsv1.GetPositionHistoryResponse, calls)
	took := make([]time.Duration, calls)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			began := time.Now()
			resp, err := st.gateways[i%3].GetPositionHistory(cctx, req)
			took[i] = time.Since(began)
			if err != nil {
				t.Errorf("call %d: %v", i, err)
				return
			}
			replies[i] = resp
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	slowest := time.Duration(0)
	for i, d := range took {
		slowest = max(slowest, d)
		if d >= deadline {
			t.Errorf("call %d answered after %v, past its deadline", i, d)
		}
		if replies[i] != nil && !proto.Equal(replies[i], replies[0]) {
			t.Errorf("call %d got another history than call 0", i)
		}
	}
	if n := len(replies[0].GetPositions()); n != 61 {
		t.Errorf("an hour of history has %d positions, want 61", n)
	}
	after := st.sim.Stats()
	noLimitErrors(t, after)
	if got := after.WialonLogins - before.WialonLogins; got != 0 {
		t.Errorf("the loads caused %d logins; they must share the one session", got)
	}
	if got := after.Requests["wialon messages/load_interval"] - before.Requests["wialon messages/load_interval"]; got != calls {
		t.Errorf("%d loads reached Wialon, want %d", got, calls)
	}
	// The measurement docs/gateway.md quotes: serialized loads of one
	// session take about calls × (load + unload).
	t.Logf("%d loads on one session over 3 replicas: %v in all, slowest call %v (simulator latency 20 ms a request)", calls, elapsed, slowest)
}

// TestReplicasShareTheSessionRequestLimit: raw calls are not coalesced, so
// 60 at once over three replicas would be 60 requests at once on the
// shared session; the cross-replica leases keep it at Wialon's 10 and
// Wialon answers no 1003.
func TestReplicasShareTheSessionRequestLimit(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 3, sim: simulator.Config{Latency: 30 * time.Millisecond}})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w", credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
	params, err := structpb.NewStruct(map[string]any{"id": 10001, "flags": 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			_, err := st.gateways[i%3].CallProvider(cctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{
				Wialon: &telematicsv1.WialonCall{Svc: "core/search_item", Params: params}}})
			if err != nil {
				t.Errorf("call %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	noLimitErrors(t, st.sim.Stats())
}

// TestRefusedWialonTokenCostsOneFailedLogin: a token Wialon refuses costs
// one failed login, however many calls, replicas and credentials use it —
// the egress IP has only 10 failed logins a minute for every tenant.
func TestRefusedWialonTokenCostsOneFailedLogin(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 3})
	bad := strings.Repeat("R", 72) // never registered with the simulator
	for _, id := range []string{"bad-1", "bad-2"} {
		if _, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id, SkipValidation: true,
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: bad, BaseUrl: st.simURL}}}); err != nil {
			t.Fatal(err)
		}
	}
	from, to := timestamppb.New(time.Now().Add(-time.Hour)), timestamppb.Now()
	var wg sync.WaitGroup
	for _, id := range []string{"bad-1", "bad-2"} {
		ctx, _ := st.issue(t, id)
		for i := range 30 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				gw := st.gateways[i%3]
				var err error
				switch i % 3 {
				case 0:
					_, err = gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
				case 1:
					_, err = gw.GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "10001", StartTime: from, EndTime: to})
				default:
					_, err = gw.ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: "10001", StartTime: from, EndTime: to})
				}
				if status.Code(err) != codes.FailedPrecondition || apierr.Reason(err) != apierr.ReasonCredentialRejected {
					t.Errorf("call %d on a refused token: %v, want FAILED_PRECONDITION CREDENTIAL_REJECTED", i, err)
				}
			}()
		}
		wg.Wait()
	}
	// Storing the same token again, with validation, asks Wialon nothing.
	_, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: "other", CredentialId: "bad-3",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: bad, BaseUrl: st.simURL}}})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("put of the refused token: %v, want FAILED_PRECONDITION", err)
	}
	stats := st.sim.Stats()
	if stats.WialonFailedLogins != 1 {
		t.Errorf("60 calls on two credentials with one refused token, and a put of it, caused %d failed logins, want 1", stats.WialonFailedLogins)
	}
	noLimitErrors(t, stats)
	if strings.Contains(st.dumpRedis(t), bad) || strings.Contains(st.logs.String(), bad) {
		t.Error("the refused token is in Redis or the logs")
	}
}

// TestWialonLoginBudgetKeepsTheIPUnblocked: more bad tokens than Wialon
// allows failed logins a minute are put at once, on two replicas of the
// credentials service. The shared budget lets at most 10 reach Wialon and
// answers the rest RESOURCE_EXHAUSTED with RetryInfo, so the IP — and
// every other tenant behind it — is never blocked.
func TestWialonLoginBudgetKeepsTheIPUnblocked(t *testing.T) {
	st := newStack(t, stackOptions{})
	replicas := []credentialsv1.CredentialServiceClient{st.creds, st.credentials(t, app.CredentialsConfig{})}
	var limited atomic.Int32
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := replicas[i%2].PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: fmt.Sprintf("b%d", i),
				Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: fmt.Sprintf("%072d", i), BaseUrl: st.simURL}}})
			switch status.Code(err) {
			case codes.FailedPrecondition:
			case codes.ResourceExhausted:
				limited.Add(1)
				if retryDelay(status.Convert(err)) <= 0 {
					t.Errorf("RESOURCE_EXHAUSTED without RetryInfo: %v", err)
				}
			default:
				t.Errorf("put %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	stats := st.sim.Stats()
	if stats.WialonFailedLogins != 10 || limited.Load() != 6 {
		t.Errorf("%d failed logins reached Wialon and %d puts were held back; want 10 and 6", stats.WialonFailedLogins, limited.Load())
	}
	noLimitErrors(t, stats)
	// A good token still logs in once the minute has passed; until then
	// the budget of failures also holds good logins back (their outcome is
	// not known until they run), which is what keeps the IP unblocked.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := st.creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "good",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: st.simURL}}})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a login while the failed budget is spent: %v, want RESOURCE_EXHAUSTED", err)
	}
}

// TestWialonHistoryPagesPastTenThousand: eight days of one message a
// minute are 11,521 messages; Wialon's page holds 10,000. Nothing is cut
// silently: the reply says it was truncated and hands a token for the
// rest, and the pages together hold every message once.
func TestWialonHistoryPagesPastTenThousand(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w")
	to := time.Now().Truncate(time.Minute)
	from := to.Add(-8 * 24 * time.Hour)
	const want = 8*24*60 + 1
	for _, size := range []int32{0, 5000} {
		t.Run(fmt.Sprintf("page size %d", size), func(t *testing.T) {
			req := &telematicsv1.GetPositionHistoryRequest{UnitId: "10002", StartTime: timestamppb.New(from), EndTime: timestamppb.New(to), PageSize: size}
			seen := map[int64]bool{}
			pages := 0
			for {
				resp, err := st.gateways[pages%2].GetPositionHistory(ctx, req)
				if err != nil {
					t.Fatal(err)
				}
				pages++
				limit := int(size)
				if limit == 0 {
					limit = 10000
				}
				if len(resp.GetPositions()) > limit {
					t.Fatalf("page %d holds %d positions, more than %d", pages, len(resp.GetPositions()), limit)
				}
				if resp.GetTruncated() != (resp.GetNextPageToken() != "") {
					t.Errorf("page %d: truncated %v with next page token %q", pages, resp.GetTruncated(), resp.GetNextPageToken())
				}
				for _, p := range resp.GetPositions() {
					sec := p.GetTime().AsTime().Unix()
					if seen[sec] {
						t.Fatalf("the position at %d came twice", sec)
					}
					seen[sec] = true
				}
				if resp.GetNextPageToken() == "" {
					break
				}
				req.PageToken = resp.GetNextPageToken()
			}
			if len(seen) != want {
				t.Errorf("%d pages held %d positions, want %d", pages, len(seen), want)
			}
			if wantPages := (want + 9999) / 10000; size == 0 && pages != wantPages {
				t.Errorf("%d pages, want %d", pages, wantPages)
			}
		})
	}
	// A token is bound to its unit and range.
	first, err := st.gateways[0].GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "10002", StartTime: timestamppb.New(from), EndTime: timestamppb.New(to)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.gateways[0].GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "10003", StartTime: timestamppb.New(from), EndTime: timestamp(to),
		PageToken: first.GetNextPageToken()})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "page_token") {
		t.Errorf("a token for another unit: %v, want INVALID_ARGUMENT naming page_token", err)
	}
}

func timestamp(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

// TestIdleWialonSessionLeavesTheCache: Wialon ends a session after 5 idle
// minutes, so the cached session lives 4 minutes past its last use, not
// its 30-minute reuse bound; a call extends it.
func TestIdleWialonSessionLeavesTheCache(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	keys, err := st.redis.Keys(context.Background(), st.prefix+":gw:{"+tenant+"}:tok:w:*").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("cached sessions: %v, %v", keys, err)
	}
	ttl := st.redis.PTTL(context.Background(), keys[0]).Val()
	if ttl > 4*time.Minute || ttl < 3*time.Minute {
		t.Errorf("the cached session lives %v; want at most the 4 minutes it can idle", ttl)
	}
	// As if three idle minutes had passed; a call (on the other replica,
	// which has not touched it within 30 s) extends it again.
	st.redis.PExpire(context.Background(), keys[0], time.Minute)
	if _, err := st.gateways[1].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
		t.Fatal(err)
	}
	if ttl := st.redis.PTTL(context.Background(), keys[0]).Val(); ttl < 3*time.Minute || ttl > 4*time.Minute {
		t.Errorf("after a call the session lives %v more; want about 4 minutes", ttl)
	}
	if n := st.sim.Stats().WialonLogins; n != 2 { // the put's validation, then the one session
		t.Errorf("%d logins, want 2", n)
	}
}

// wialonFake answers every svc from replies (error objects or values),
// else passes to the simulator, counting logins.
type wialonFake struct {
	sim     http.Handler
	replies map[string]string
	logins  atomic.Int32
}

func (f *wialonFake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	svc := r.PostForm.Get("svc")
	if svc == "token/login" {
		f.logins.Add(1)
	}
	if reply, ok := f.replies[svc]; ok {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(strings.ReplaceAll(reply, "$SID", r.PostForm.Get("sid"))))
		return
	}
	f.sim.ServeHTTP(w, r)
}

// TestWialonErrorsCallersCanActOn: every documented code the gateway can
// meet comes back as a status a caller can act on.
func TestWialonErrorsCallersCanActOn(t *testing.T) {
	from, to := timestamppb.New(time.Now().Add(-time.Hour)), timestamppb.Now()
	history := func(ctx context.Context, gw telematicsv1.TelematicsServiceClient) error {
		_, err := gw.GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: "10001", StartTime: from, EndTime: to})
		return err
	}
	units := func(ctx context.Context, gw telematicsv1.TelematicsServiceClient) error {
		_, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
		return err
	}
	tests := []struct {
		name    string
		replies map[string]string
		call    func(context.Context, telematicsv1.TelematicsServiceClient) error
		code    codes.Code
		text    string
		retry   bool
		logins  int32
	}{
		{"1004 too many messages", map[string]string{"messages/load_interval": `{"error":1004}`}, history, codes.InvalidArgument, "narrow the interval", false, 1},
		{"1005 too long", map[string]string{"messages/load_interval": `{"error":1005}`}, history, codes.InvalidArgument, "narrow the interval", false, 1},
		{"6 unknown error", map[string]string{"core/search_items": `{"error":6}`}, units, codes.Unavailable, "unavailable", true, 1},
		// The login is the credentials service's: the gateway relays its
		// code, reason and wait, never its text (errors.go, relayed).
		{"9 authorization server at login", map[string]string{"token/login": `{"error":9}`}, units, codes.Unavailable, "unavailable", true, 1},
		{"1011 session expired or IP changed, twice", map[string]string{"core/search_items": `{"error":1011}`}, units, codes.Unavailable, "egress IP changed", true, 2},
		{"1003 that never clears", map[string]string{"core/search_items": `{"error":1003,"reason":"LIMIT api_concurrent"}`}, units, codes.ResourceExhausted, "rate limit", true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &wialonFake{sim: simulator.New(simulator.Config{Demo: true}).Handler(), replies: tt.replies}
			url, _ := serveUpstream(t, fake)
			st := newStack(t, stackOptions{extraAllowed: []string{strings.TrimPrefix(url, "http://")}})
			if _, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "w", SkipValidation: true,
				Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: url}}}); err != nil {
				t.Fatal(err)
			}
			ctx, _ := st.issue(t, "w")
			err := tt.call(ctx, st.gateways[0])
			if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.text) {
				t.Errorf("got %v, want %v saying %q", err, tt.code, tt.text)
			}
			if got := retryDelay(status.Convert(err)) > 0; got != tt.retry {
				t.Errorf("RetryInfo: %v, want %v", got, tt.retry)
			}
			if got := fake.logins.Load(); got != tt.logins {
				t.Errorf("%d logins, want %d", got, tt.logins)
			}
		})
	}
}

// TestWialonRawReplyNeverCarriesTheSession: whatever a service echoes, the
// shared session id is cut out of a raw reply.
func TestWialonRawReplyNeverCarriesTheSession(t *testing.T) {
	fake := &wialonFake{sim: simulator.New(simulator.Config{Demo: true}).Handler(),
		replies: map[string]string{"core/search_item": `{"item":{"id":10001,"note":"session $SID"},"sid":"$SID"}`}}
	url, seen := serveUpstream(t, fake)
	st := newStack(t, stackOptions{extraAllowed: []string{strings.TrimPrefix(url, "http://")}})
	if _, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "w",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: url}}}); err != nil {
		t.Fatal(err)
	}
	ctx, _ := st.issue(t, "w", credentialsv1.Scope_SCOPE_RAW)
	resp, err := st.gateways[0].CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{
		Wialon: &telematicsv1.WialonCall{Svc: "core/search_item"}}})
	if err != nil {
		t.Fatal(err)
	}
	sids := seen.issuedSIDs()
	if len(sids) == 0 {
		t.Fatal("no session was issued: the check below proves nothing")
	}
	for sid := range sids {
		if strings.Contains(resp.GetJson(), sid) {
			t.Errorf("the raw reply carries the session id: %s", resp.GetJson())
		}
	}
	var reply map[string]any
	if err := json.Unmarshal([]byte(resp.GetJson()), &reply); err != nil || reply["sid"] != "[redacted]" {
		t.Errorf("reply %s: %v", resp.GetJson(), err)
	}
}

// TestWialonOperateAs: a credential may log in as another user of the
// token's account (token/login operateAs).
func TestWialonOperateAs(t *testing.T) {
	st := newStack(t, stackOptions{})
	resp, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "w",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: st.simURL, OperateAs: "dispatcher"}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetCredential().GetUpstreamUser(); got != "dispatcher" {
		t.Errorf("upstream user %q, want the operated-as user", got)
	}
	ctx, _ := st.issue(t, "w")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
}
