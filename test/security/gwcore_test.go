package security_test

// The gateway's core under attack: findings 4 (no cap on WatchPositions
// streams) and 10 (internal detail in the gateway's errors).

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"

	"github.com/fleetbroker/fleetbroker/client"
	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// openWatch opens a WatchPositions stream and waits for its first answer:
// nil when the stream was accepted (its first positions arrived), else the
// status that refused it. The stream stays open until cancel is called.
func openWatch(t *testing.T, gw telematicsv1.TelematicsServiceClient, h string) (cancel context.CancelFunc, err error) {
	t.Helper()
	ctx, cancel := context.WithCancel(WithHandle(context.Background(), h))
	t.Cleanup(cancel)
	stream, err := gw.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{})
	if err != nil {
		cancel()
		return nil, err
	}
	first := make(chan error, 1)
	go func() { _, err := stream.Recv(); first <- err }()
	select {
	case err := <-first:
		if err != nil {
			cancel()
			return nil, err
		}
		return cancel, nil
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("a WatchPositions stream neither answered nor was refused within 30s")
		return nil, nil
	}
}

// wantTooManyStreams fails unless err refuses a stream for its limit.
func wantTooManyStreams(t *testing.T, what string, err error) {
	t.Helper()
	if status.Code(err) != codes.ResourceExhausted || apierr.Reason(err) != apierr.ReasonTooManyStreams || !strings.Contains(status.Convert(err).Message(), "limit") {
		t.Fatalf("%s: %v (reason %q); want RESOURCE_EXHAUSTED %s naming the limit", what, err, apierr.Reason(err), apierr.ReasonTooManyStreams)
	}
}

// TestWatchStreamsAreCapped is finding 4: 10,000 WatchPositions streams on
// one handle were all accepted and grew the process by 770 MB. A handle and
// a tenant may hold only so many streams on a gateway replica; past that,
// RESOURCE_EXHAUSTED TOO_MANY_STREAMS with a message naming the limit, and
// other handles and tenants keep streaming.
func TestWatchStreamsAreCapped(t *testing.T) {
	t.Run("the default limit per handle", func(t *testing.T) {
		s := Start(t, Options{})
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		attacker := s.Issue(t, TenantAcme, CredWialon, 0).GetHandle()
		// The attacker opens streams on one handle until refused.
		for i := range gateway.DefaultMaxStreamsPerHandle {
			if _, err := openWatch(t, gw, attacker); err != nil {
				t.Fatalf("stream %d of %d on one handle: %v", i+1, gateway.DefaultMaxStreamsPerHandle, err)
			}
		}
		for i := range 20 {
			_, err := openWatch(t, gw, attacker)
			wantTooManyStreams(t, fmt.Sprintf("stream %d over the per-handle limit", i+1), err)
		}
		// Another caller of the same tenant is not locked out by it.
		if _, err := openWatch(t, gw, s.Issue(t, TenantAcme, CredWialon, 0).GetHandle()); err != nil {
			t.Fatalf("another handle while the attacker's is at its limit: %v", err)
		}
		s.AssertNoLeak(t, attacker)
	})

	t.Run("per handle and per tenant", func(t *testing.T) {
		const perHandle, perTenant = 3, 5
		s := Start(t, Options{Gateway: func(c *app.GatewayConfig) {
			c.MaxStreamsPerHandle, c.MaxStreamsPerTenant = perHandle, perTenant
		}})
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		first, second := s.Issue(t, TenantAcme, CredWialon, 0).GetHandle(), s.Issue(t, TenantAcme, CredFleetUp, 0).GetHandle()
		var firstStreams []context.CancelFunc
		for range perHandle {
			cancel, err := openWatch(t, gw, first)
			if err != nil {
				t.Fatal(err)
			}
			firstStreams = append(firstStreams, cancel)
		}
		_, err := openWatch(t, gw, first)
		wantTooManyStreams(t, "a handle over its limit", err)
		for range perTenant - perHandle {
			if _, err := openWatch(t, gw, second); err != nil {
				t.Fatal(err)
			}
		}
		_, err = openWatch(t, gw, second)
		wantTooManyStreams(t, "a tenant over its limit", err)
		// Another tenant is not affected.
		globex := s.Issue(t, TenantGlobex, CredWialon, 0).GetHandle()
		gwGlobex := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalGlobex}))
		for range perHandle {
			if _, err := openWatch(t, gwGlobex, globex); err != nil {
				t.Fatalf("another tenant's stream while acme is at its limit: %v", err)
			}
		}
		// A closed stream frees its place, for its handle and its tenant.
		firstStreams[0]()
		reopened := false
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			// Polling: the server notices the cancellation on its own time.
			if _, err := openWatch(t, gw, first); err == nil {
				reopened = true
				break
			} else if apierr.Reason(err) != apierr.ReasonTooManyStreams {
				t.Fatal(err)
			}
		}
		if !reopened {
			t.Fatal("a stream closed by its caller never freed its place")
		}
		_, err = openWatch(t, gw, second)
		wantTooManyStreams(t, "the tenant, full again", err)
		s.AssertNoLeak(t, first, second, globex)
	})
}

// statusText is everything a caller can read of a failed call: the code,
// the message and every detail.
func statusText(err error) string {
	return prototext.Format(status.Convert(err).Proto())
}

// callWithID makes one ListUnits call with a request id of its own, so the
// log line of its cause can be found.
func callWithID(gw telematicsv1.TelematicsServiceClient, h, requestID string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(WithHandle(ctx, h), "x-request-id", requestID)
	_, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	return err
}

// wantCauseLogged fails unless a log line of the call requestID holds want.
func wantCauseLogged(t *testing.T, s *Stack, requestID, want string) {
	t.Helper()
	for line := range strings.SplitSeq(s.Logs.String(), "\n") {
		if strings.Contains(line, `"request_id":"`+requestID+`"`) && strings.Contains(line, want) {
			return
		}
	}
	t.Errorf("no log line of request %s holds the cause (%q)", requestID, want)
}

// TestGatewayErrorsCarryNoInternalDetail is finding 10: the gateway passed
// the credentials service's statuses to its callers unchanged (the
// gateway's SPIFFE id, a tenant's name, the credentials service's address
// in a raw connection error), and the provider's own error text with its
// secrets scrubbed only by exact match and only when 4+ characters long.
// Callers now get a stable reason and a generic message; the cause is in
// the gateway's log under the call's request id.
func TestGatewayErrorsCarryNoInternalDetail(t *testing.T) {
	t.Run("the credentials service refuses the gateway", func(t *testing.T) {
		// The gateway is granted acme only: globex's handles resolve to a
		// PERMISSION_DENIED naming the gateway's principal and the tenant.
		pol := strings.Replace(DefaultPolicy, `tenants: ["*"]`, `tenants: [acme]`, 1)
		s := Start(t, Options{Policy: pol})
		h := s.Issue(t, TenantGlobex, CredWialon, 0).GetHandle()
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalGlobex}))
		err := callWithID(gw, h, "h9-refused-1")
		if status.Code(err) != codes.Internal || apierr.Reason(err) != apierr.ReasonInternal {
			t.Errorf("call the credentials service refuses for the gateway: %v; want INTERNAL %s", err, apierr.ReasonInternal)
		}
		text := statusText(err)
		for _, leak := range []string{"spiffe://", PrincipalGateway, "sessions.resolve", TenantGlobex, TenantAcme, "principal"} {
			if strings.Contains(text, leak) {
				t.Errorf("the caller's error holds %q:\n%s", leak, text)
			}
		}
		wantCauseLogged(t, s, "h9-refused-1", "sessions.resolve")
		s.AssertNoLeak(t, h)
	})

	t.Run("the credentials service is unreachable", func(t *testing.T) {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := lis.Addr().String()
		lis.Close() // nothing listens there: connection refused
		s := Start(t, Options{Gateway: func(c *app.GatewayConfig) { c.CredentialsAddr = dead }})
		h := s.Issue(t, TenantAcme, CredWialon, 0).GetHandle()
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		err = callWithID(gw, h, "h9-unreachable-1")
		if status.Code(err) != codes.Unavailable || apierr.Reason(err) != apierr.ReasonCredentialsUnavailable || !hasRetryInfo(err) {
			t.Errorf("call with the credentials service unreachable: %v; want UNAVAILABLE %s with RetryInfo", err, apierr.ReasonCredentialsUnavailable)
		}
		_, port, _ := net.SplitHostPort(dead)
		text := statusText(err)
		for _, leak := range []string{"127.0.0.1", port, "dial", "connection", "refused", "transport"} {
			if strings.Contains(text, leak) {
				t.Errorf("the caller's error holds %q:\n%s", leak, text)
			}
		}
		wantCauseLogged(t, s, "h9-unreachable-1", "connection refused")
		s.AssertNoLeak(t, h)
	})

	t.Run("the provider quotes secrets in its error text", func(t *testing.T) {
		echo := newEchoUpstream(t)
		s := Start(t, Options{
			Credentials: func(c *app.CredentialsConfig) { c.AllowedUpstreams += "," + echo.host },
			Gateway:     func(c *app.GatewayConfig) { c.AllowedUpstreams += "," + echo.host },
		})
		acme := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme}))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, put := range []*credentialsv1.PutCredentialRequest{
			WialonPut(TenantAcme, "wialon-echo", echoWialonToken, echo.url),
			{TenantId: TenantAcme, CredentialId: "fleetup-echo", Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
				ApiKey: echoShortAPIKey, AccountId: echoAccount, Secret: echoShortSecret, BaseUrl: echo.url}}},
		} {
			if _, err := acme.PutCredential(ctx, put); err != nil {
				t.Fatalf("put %s: %v", put.GetCredentialId(), err)
			}
		}
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		for _, c := range []struct{ credential, requestID string }{
			{"wialon-echo", "h9-echo-wialon"},
			{"fleetup-echo", "h9-echo-fleetup"},
		} {
			h := s.Issue(t, TenantAcme, c.credential, 0).GetHandle()
			err := callWithID(gw, h, c.requestID)
			if status.Code(err) != codes.Unavailable || apierr.Reason(err) != apierr.ReasonUpstreamUnavailable || !hasRetryInfo(err) {
				t.Errorf("%s: %v; want UNAVAILABLE %s with RetryInfo", c.credential, err, apierr.ReasonUpstreamUnavailable)
			}
			text := statusText(err)
			for _, leak := range append(echo.quoted(), echoMarker) {
				if strings.Contains(text, leak) {
					t.Errorf("%s: the caller's error holds the provider's text (%.12q…):\n%s", c.credential, leak, text)
				}
			}
			wantCauseLogged(t, s, c.requestID, "unavailable")
			s.AssertNoLeak(t, h)
		}
		if len(echo.quoted()) < 4 {
			t.Fatalf("the echo upstream quoted only %d secrets; the test did not run", len(echo.quoted()))
		}
		// The long secrets in every form the upstream quoted them: nowhere
		// in logs, audit or Redis. The short ones cannot be searched for
		// everywhere (three characters occur by chance in ciphertexts); the
		// logs must not hold the provider's sentence that quoted them.
		s.AssertNoLeak(t, echo.quotedLong()...)
		if logs := s.Logs.String(); strings.Contains(logs, "key "+echoShortAPIKey) || strings.Contains(logs, "secret "+echoShortSecret) {
			t.Error("the logs hold the provider's text quoting a short secret")
		}
	})
}

func hasRetryInfo(err error) bool {
	return client.IsRetryable(err)
}

// Secrets of the echo upstream's credentials: a real-length Wialon token,
// and a FleetUp API key and secret of three characters (the contract
// accepts one).
const (
	echoWialonToken = "EchoCanaryWialonToken000000000000000000000000000000000000000000000000001"
	echoShortAPIKey = "Zq9"
	echoShortSecret = "Yx7"
	echoAccount     = int64(880001)
	// echoMarker is in every error text the echo upstream writes.
	echoMarker = "upstream-echo-marker"
)

// echoUpstream is a Wialon and FleetUp upstream that logs in like the
// simulator and then fails every data call with an error text quoting the
// session it was sent — swapped to upper case, URL-escaped — and the
// FleetUp API key and secret, as a buggy or hostile provider might.
type echoUpstream struct {
	url, host string
	mu        sync.Mutex
	seen      map[string]bool // the secret forms quoted so far
}

func newEchoUpstream(t *testing.T) *echoUpstream {
	t.Helper()
	sim := simulator.New(simulator.Config{Units: 2})
	sim.AddWialonToken(echoWialonToken)
	sim.AddFleetUpAccount(echoShortAPIKey, echoAccount, echoShortSecret)
	e := &echoUpstream{seen: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/wialon/ajax.html") {
			if err := r.ParseForm(); err != nil {
				http.Error(w, "bad form", http.StatusBadRequest)
				return
			}
			if svc := r.Form.Get("svc"); svc == "token/login" || svc == "core/logout" {
				sim.Handler().ServeHTTP(w, r)
				return
			}
			sid := r.Form.Get("sid")
			reason := fmt.Sprintf("%s: session %s (%s) failed", echoMarker, e.quote(strings.ToUpper(sid)), e.quote(url.QueryEscape(sid)))
			writeEchoJSON(w, http.StatusOK, map[string]any{"error": 5, "reason": reason})
			return
		}
		if r.URL.Path == "/token" {
			sim.Handler().ServeHTTP(w, r)
			return
		}
		jwt := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		msg := fmt.Sprintf("%s: key %s secret %s jwt %s", echoMarker, r.Header.Get("x-api-key"), echoShortSecret, e.quote(strings.ToUpper(jwt)))
		writeEchoJSON(w, http.StatusServiceUnavailable, map[string]any{"code": 503, "message": msg})
	}))
	t.Cleanup(srv.Close)
	e.url, e.host = srv.URL, strings.TrimPrefix(srv.URL, "http://")
	return e
}

// quote records a secret form the upstream put in an error text.
func (e *echoUpstream) quote(s string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if s != "" {
		e.seen[s] = true
	}
	return s
}

func (e *echoUpstream) quoted() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []string{echoShortAPIKey, echoShortSecret}
	for s := range e.seen {
		out = append(out, s)
	}
	return out
}

func (e *echoUpstream) quotedLong() []string {
	var out []string
	for _, s := range e.quoted() {
		if len(s) >= 16 {
			out = append(out, s)
		}
	}
	return out
}

func writeEchoJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
