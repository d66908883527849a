package security_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// The Wialon authorization flow as production runs it: the callback on its
// own TLS listener (the credentials service's certificate), StartWialon-
// Authorization and WatchCredentialEvents behind mTLS and the policy, the
// callback audited in the starter's name in the same audit file.

// connectStack is a Stack with the authorization flow configured.
type connectStack struct {
	*Stack
	publicURL string
	returnURL string
	browser   *http.Client // trusts the stack's CA; stops at every redirect
	metrics   *telemetry.Metrics
}

func startConnect(t *testing.T, opts Options) *connectStack {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ret := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("product")) }))
	t.Cleanup(ret.Close)
	cs := &connectStack{publicURL: "https://localhost:" + fmt.Sprint(lis.Addr().(*net.TCPAddr).Port), returnURL: ret.URL + "/settings/wialon", metrics: telemetry.NewMetrics()}
	inner := opts.Credentials
	opts.Credentials = func(c *app.CredentialsConfig) {
		c.Authorize = app.AuthorizeConfig{PublicURL: cs.publicURL, ReturnURLs: ret.URL + "/settings"}
		if inner != nil {
			inner(c)
		}
	}
	opts.CredentialsDeps = func(d *app.Deps) { d.AuthorizeListener, d.Metrics = lis, cs.metrics }
	cs.Stack = Start(t, opts)
	roots := x509.NewCertPool()
	pem, err := os.ReadFile(cs.PKI.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(pem)
	cs.browser = &http.Client{Timeout: 30 * time.Second,
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return cs
}

// start calls StartWialonAuthorization as id.
func (cs *connectStack) start(t *testing.T, id Identity, tenant, credential string) (*credentialsv1.StartWialonAuthorizationResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return credentialsv1.NewCredentialServiceClient(cs.Dial(t, cs.CredsAddr, id)).StartWialonAuthorization(ctx,
		&credentialsv1.StartWialonAuthorizationRequest{TenantId: tenant, CredentialId: credential, ReturnUrl: cs.returnURL, BaseUrl: cs.SimURL})
}

// visit makes one browser request and returns the status and Location.
func (cs *connectStack) visit(t *testing.T, method, u string, form url.Values) (int, string) {
	t.Helper()
	var resp *http.Response
	var err error
	if method == http.MethodPost {
		resp, err = cs.browser.PostForm(u, form)
	} else {
		resp, err = cs.browser.Get(u)
	}
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Location")
}

// approve opens the login page of an authorize URL and presses Allow; it
// returns the callback URL Wialon redirects to.
func (cs *connectStack) approve(t *testing.T, authorizeURL string) string {
	t.Helper()
	if code, _ := cs.visit(t, http.MethodGet, authorizeURL, nil); code != http.StatusOK {
		t.Fatalf("login.html: %d", code)
	}
	u, err := url.Parse(authorizeURL)
	if err != nil {
		t.Fatal(err)
	}
	form := u.Query()
	form.Set("action", "allow")
	form.Set("login", "acme_fleet")
	code, loc := cs.visit(t, http.MethodPost, cs.SimURL+"/login.html", form)
	if code != http.StatusFound || !strings.HasPrefix(loc, cs.publicURL+credentials.CallbackPath) {
		t.Fatalf("login.html POST: %d %q", code, loc)
	}
	return loc
}

// TestConnectFlowEndToEnd: start (mTLS, policy) → the simulator's
// login.html → approve → the TLS callback → the return URL; the credential
// is stored, validated and usable through the gateway, the events reach a
// read-only watcher, the callback is audited in the starter's name, and
// the token is nowhere: not in a log, an audit record, Redis, a metric or
// a redirect.
func TestConnectFlowEndToEnd(t *testing.T) {
	cs := startConnect(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The reporting workload may only read acme's credentials: enough to
	// watch their events.
	watch, err := credentialsv1.NewCredentialServiceClient(cs.Dial(t, cs.CredsAddr, Identity{DNS: DNSReporting})).
		WatchCredentialEvents(ctx, &credentialsv1.WatchCredentialEventsRequest{TenantId: TenantAcme})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}

	resp, err := cs.start(t, Identity{URI: PrincipalAcme}, TenantAcme, "wialon-connected")
	if err != nil {
		t.Fatal(err)
	}
	callback := cs.approve(t, resp.GetAuthorizeUrl())
	cb, _ := url.Parse(callback)
	token := cb.Query().Get("access_token")
	code, loc := cs.visit(t, http.MethodGet, callback, nil)
	if code != http.StatusSeeOther || loc != cs.returnURL+"?credential_id=wialon-connected&status=connected" {
		t.Fatalf("callback: %d %q", code, loc)
	}
	ev, err := watch.Recv()
	if err != nil || ev.GetEvent().GetType() != credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_CREATED || ev.GetEvent().GetCredentialId() != "wialon-connected" {
		t.Fatalf("event %v, %v; want CREATED of wialon-connected", ev, err)
	}

	// Usable through the gateway, with the token Wialon issued.
	h := cs.Issue(t, TenantAcme, "wialon-connected", time.Minute)
	units, err := telematicsv1.NewTelematicsServiceClient(cs.Dial(t, cs.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"})).ListUnits(WithHandle(ctx, h.GetHandle()), &telematicsv1.ListUnitsRequest{PageSize: 3})
	if err != nil || len(units.GetUnits()) == 0 {
		t.Fatalf("ListUnits through the gateway: %v, %v", units, err)
	}

	// Audited: the start by the interceptor, the callback in acme's name.
	var callbackOK bool
	for _, ev := range ReadAudit(t, cs.CredsAudit) {
		if ev.Method == credentials.CallbackAuditMethod && ev.Phase == audit.PhaseOutcome {
			callbackOK = ev.Principal == PrincipalAcme && ev.Via == "uri-san" && ev.Result == audit.ResultOK &&
				ev.TenantID == TenantAcme && ev.CredentialID == "wialon-connected" && ev.Action == "credentials.write"
		}
	}
	if !callbackOK {
		t.Error("no ok outcome of the callback in acme's name in the audit trail")
	}
	if len(Outcomes(ReadAudit(t, cs.CredsAudit), credentialsv1.CredentialService_StartWialonAuthorization_FullMethodName)) != 1 {
		t.Error("the start is not on record")
	}

	mfs, err := cs.metrics.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	metrics := fmt.Sprint(mfs)
	for _, secret := range []string{token, cb.Path} {
		if strings.Contains(metrics, secret) || strings.Contains(loc, secret) {
			t.Error("the token or state is in the metrics or the return URL")
		}
	}
	if !strings.Contains(metrics, "wialon_authorizations_total") {
		t.Error("no authorization metrics")
	}
	cs.AssertNoLeak(t, token, strings.TrimPrefix(cb.Path, credentials.CallbackPath))
}

// TestConnectAttackers: only a principal with credentials.write on the
// tenant may start a flow, and only one with credentials.read may watch its
// events; a state works once, for the tenant it was made for; forged states
// store nothing and are on record.
func TestConnectAttackers(t *testing.T) {
	cs := startConnect(t, Options{Credentials: func(c *app.CredentialsConfig) { c.Security.ClientCertOptional = true }})
	for _, at := range []struct {
		name  string
		id    Identity
		watch bool // may watch acme's events
	}{
		{"another tenant's workload", Identity{URI: PrincipalGlobex}, false},
		{"workload without a grant", Identity{URI: "spiffe://example.org/ns/nobody/sa/x"}, false},
		{"read-only API key", Identity{APIKey: KeyBillingBatch}, true},
		{"read-only DNS workload", Identity{DNS: DNSReporting}, true},
		{"CN spelling acme's SPIFFE ID", Identity{CN: PrincipalAcme}, false},
		{"the gateway", Identity{URI: PrincipalGateway}, false},
		{"no identity", Identity{}, false},
	} {
		t.Run(at.name, func(t *testing.T) {
			conn := cs.Dial(t, cs.CredsAddr, at.id)
			id := newRequestID(t)
			ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), requestid.Header, id), 10*time.Second)
			defer cancel()
			_, err := credentialsv1.NewCredentialServiceClient(conn).StartWialonAuthorization(ctx, &credentialsv1.StartWialonAuthorizationRequest{
				TenantId: TenantAcme, CredentialId: CredWialon, ReturnUrl: cs.returnURL, BaseUrl: cs.SimURL})
			if c := status.Code(err); c != codes.PermissionDenied && c != codes.Unauthenticated {
				t.Errorf("StartWialonAuthorization: %v, want refused", err)
			} else {
				assertDenied(t, cs.CredsAudit, id, credentialsv1.CredentialService_StartWialonAuthorization_FullMethodName)
			}
			if at.watch {
				return
			}
			wid := newRequestID(t)
			wctx, wcancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), requestid.Header, wid), 10*time.Second)
			defer wcancel()
			s, err := credentialsv1.NewCredentialServiceClient(conn).WatchCredentialEvents(wctx, &credentialsv1.WatchCredentialEventsRequest{TenantId: TenantAcme})
			if err == nil {
				_, err = s.Recv()
			}
			if c := status.Code(err); c != codes.PermissionDenied && c != codes.Unauthenticated {
				t.Errorf("WatchCredentialEvents: %v, want refused", err)
			} else {
				assertDenied(t, cs.CredsAudit, wid, credentialsv1.CredentialService_WatchCredentialEvents_FullMethodName)
			}
		})
	}

	// globex connects its own credential: the state is globex's; acme's
	// credential of the same id is untouched, and a replay does nothing.
	resp, err := cs.start(t, Identity{URI: PrincipalGlobex}, TenantGlobex, CredWialon)
	if err != nil {
		t.Fatal(err)
	}
	callback := cs.approve(t, resp.GetAuthorizeUrl())
	if code, loc := cs.visit(t, http.MethodGet, callback, nil); code != http.StatusSeeOther || !strings.HasSuffix(loc, "status=connected") {
		t.Fatalf("globex's callback: %d %q", code, loc)
	}
	if code, loc := cs.visit(t, http.MethodGet, callback, nil); code != http.StatusBadRequest || loc != "" {
		t.Errorf("replayed callback: %d %q, want 400 and no redirect", code, loc)
	}
	assertUnchanged(t, cs.Stack)
	got, err := credentialsv1.NewCredentialServiceClient(cs.Dial(t, cs.CredsAddr, Identity{URI: PrincipalGlobex})).
		GetCredential(context.Background(), &credentialsv1.GetCredentialRequest{TenantId: TenantGlobex, CredentialId: CredWialon})
	if err != nil || got.GetCredential().GetVersion() != 2 || got.GetCredential().GetUpstreamUser() != "acme_fleet" {
		t.Errorf("globex's credential %v, %v: want it replaced once by the connected token", got, err)
	}

	// Forged and malformed states, from anyone on the internet.
	before := len(ReadAudit(t, cs.CredsAudit))
	for _, path := range []string{strings.Repeat("A", 43), "x", strings.Repeat("A", 44), "../../v1"} {
		code, loc := cs.visit(t, http.MethodGet, cs.publicURL+credentials.CallbackPath+path+"?access_token="+attackerToken, nil)
		if code != http.StatusBadRequest && code != http.StatusNotFound || loc != "" {
			t.Errorf("state %q: %d %q, want an error page", path, code, loc)
		}
	}
	var denied int
	for _, ev := range ReadAudit(t, cs.CredsAudit)[before:] {
		if ev.Method == credentials.CallbackAuditMethod && ev.Result == audit.ResultDenied && ev.Reason == credentials.ReasonStateInvalid && ev.Principal == "" {
			denied++
		}
	}
	if denied < 3 {
		t.Errorf("%d forged callbacks on record as denied, want at least 3", denied)
	}
	// The gRPC port does not serve the callback, nor the callback port gRPC.
	plain := &http.Client{Timeout: 5 * time.Second, Transport: cs.browser.Transport}
	if resp, err := plain.Get("https://" + cs.CredsAddr + credentials.CallbackPath + strings.Repeat("A", 43)); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusSeeOther {
			t.Error("the gRPC port answers the callback")
		}
	}
	assertUnchanged(t, cs.Stack)
	cs.AssertNoLeak(t, attackerToken, KeyBillingBatch)
}

// TestConnectCallbackAuditFailsClosed: with the audit file on a full disk,
// the callback stores nothing and tells the browser it failed.
func TestConnectCallbackAuditFailsClosed(t *testing.T) {
	dir := smallDisk(t)
	cs := startConnect(t, Options{AuditDir: dir, NoSeed: true})
	resp, err := cs.start(t, Identity{URI: PrincipalAcme}, TenantAcme, "full-disk")
	if err != nil {
		t.Fatal(err)
	}
	callback := cs.approve(t, resp.GetAuthorizeUrl())
	creds := credentialsv1.NewCredentialServiceClient(cs.Dial(t, cs.CredsAddr, Identity{URI: PrincipalAcme}))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	free := fill(t, dir)
	// The file's last, partly used block still takes a few lines.
	for i := 0; ; i++ {
		_, err := creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: TenantAcme})
		if apierr.Reason(err) == apierr.ReasonAuditUnavailable {
			break
		}
		if err != nil || i == 100 {
			t.Fatalf("reading with the audit disk filling up: call %d: %v", i, err)
		}
	}
	code, loc := cs.visit(t, http.MethodGet, callback, nil)
	free()
	if code != http.StatusSeeOther || !strings.HasSuffix(loc, "status=error") {
		t.Errorf("callback on a full audit disk: %d %q, want status=error", code, loc)
	}
	_, err = creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: TenantAcme, CredentialId: "full-disk"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("GetCredential: %v, want NotFound: nothing may be stored unrecorded", err)
	}
}
