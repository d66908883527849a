package credentials_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

var statePath = regexp.MustCompile(`^/wialon/callback/([A-Za-z0-9_-]{43})$`)

// startAuthorization asks r for a login.html URL for tenant/credential.
func startAuthorization(t *testing.T, r *replica, w *connectWorld, tenant, credential string, duration time.Duration) *credentialsv1.StartWialonAuthorizationResponse {
	t.Helper()
	req := &credentialsv1.StartWialonAuthorizationRequest{TenantId: tenant, CredentialId: credential, ReturnUrl: w.returnURL(),
		BaseUrl: w.simURL, Labels: map[string]string{"source": "connect"}}
	if duration > 0 {
		req.Duration = durationpb.New(duration)
	}
	resp, err := r.creds.StartWialonAuthorization(as(principalAcme), req)
	if err != nil {
		t.Fatalf("StartWialonAuthorization: %v", err)
	}
	return resp
}

// auditRecords returns the callback's records in the audit trail.
func (w *connectWorld) callbackRecords(t *testing.T) []audit.Event {
	t.Helper()
	var out []audit.Event
	for _, line := range strings.Split(strings.TrimSpace(w.audit.String()), "\n") {
		if line == "" {
			continue
		}
		var ev audit.Event
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ev); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, ev)
	}
	return out
}

// TestWialonAuthorizationFlow drives the whole flow over real HTTP and gRPC:
// start on one replica → the simulator's login.html → approve → the
// callback on another replica → the return page; the token is stored,
// validated and resolvable, with its expiry, and has left no trace
// anywhere but the encrypted record.
func TestWialonAuthorizationFlow(t *testing.T) {
	for _, be := range connectBackends() {
		t.Run(be.name, func(t *testing.T) {
			w := newConnectWorld(t, be)
			reg := prometheus.NewRegistry()
			a := w.start(replicaOptions{registerer: reg})
			b := w.start(replicaOptions{})
			ctx := context.Background()

			watch, err := b.creds.WatchCredentialEvents(as(principalAcme), &credentialsv1.WatchCredentialEventsRequest{TenantId: "acme"})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := watch.Header(); err != nil {
				t.Fatal(err)
			}

			before := time.Now()
			resp := startAuthorization(t, a, w, "acme", "wialon-main", 24*time.Hour)
			if got := resp.GetExpireTime().AsTime(); got.Before(before.Add(credentials.StateTTL-time.Minute)) || got.After(time.Now().Add(credentials.StateTTL)) {
				t.Errorf("expire_time %v, want 10 minutes from now", got)
			}
			login, err := url.Parse(resp.GetAuthorizeUrl())
			if err != nil {
				t.Fatal(err)
			}
			q := login.Query()
			if login.Scheme+"://"+login.Host != w.simURL || login.Path != "/login.html" {
				t.Errorf("authorize URL %s, want the credential's Wialon's login.html", login)
			}
			for k, want := range map[string]string{"client_id": "acme-fleet", "access_type": "0x100", "activation_time": "0",
				"duration": "86400", "flags": "0x1", "response_type": "token"} {
				if q.Get(k) != want {
					t.Errorf("login.html %s = %q, want %q", k, q.Get(k), want)
				}
			}
			redirect, err := url.Parse(q.Get("redirect_uri"))
			if err != nil || redirect.Scheme+"://"+redirect.Host != a.publicURL || !statePath.MatchString(redirect.Path) || redirect.RawQuery != "" {
				t.Fatalf("redirect_uri %q, want %s/wialon/callback/<state>", q.Get("redirect_uri"), a.publicURL)
			}
			state := statePath.FindStringSubmatch(redirect.Path)[1]
			dump := w.dump()
			if strings.Contains(dump, state) {
				t.Error("the state is stored in Redis in plaintext")
			}
			if !strings.Contains(dump, ":authz:wialon:") {
				t.Error("no hashed state key in Redis")
			}

			// Wialon redirects to the callback of replica a; send the browser
			// to replica b's instead: any replica completes any flow.
			callback := approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil)
			cb, err := url.Parse(callback)
			if err != nil {
				t.Fatal(err)
			}
			token := cb.Query().Get("access_token")
			if len(token) != 72 {
				t.Fatalf("Wialon sent %q", callback)
			}
			cb.Host = strings.TrimPrefix(b.publicURL, "http://")
			got := get(t, cb.String())
			if got.status != http.StatusSeeOther {
				t.Fatalf("callback answered %d %s", got.status, got.body)
			}
			for h, want := range map[string]string{"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"} {
				if got.header.Get(h) != want {
					t.Errorf("callback %s = %q, want %q", h, got.header.Get(h), want)
				}
			}
			ret, err := url.Parse(got.location)
			if err != nil {
				t.Fatal(err)
			}
			if ret.Scheme+"://"+ret.Host+ret.Path != w.returnURL() || ret.Query().Encode() != "credential_id=wialon-main&status=connected" {
				t.Errorf("redirected to %s, want the return URL with only status=connected and credential_id", ret)
			}
			if page := get(t, got.location); page.status != http.StatusOK {
				t.Errorf("return page: %d", page.status)
			}

			cred, err := a.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "wialon-main"})
			if err != nil {
				t.Fatal(err)
			}
			c := cred.GetCredential()
			expire := c.GetTokenExpireTime().AsTime()
			if c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID || c.GetUpstreamUser() != "fleet_manager" ||
				c.GetVersion() != 1 || c.GetBaseUrl() != w.simURL || c.GetLabels()["source"] != "connect" ||
				expire.Before(before.Add(24*time.Hour)) || expire.After(time.Now().Add(24*time.Hour)) {
				t.Errorf("stored credential %v, want valid, fleet_manager, version 1, its base URL and labels, expiring in a day", c)
			}
			// The callback logged in with the token: that is a use, which the
			// keep-alive counts from (keepalive.go).
			if used := c.GetLastUseTime().AsTime(); c.GetLastUseTime() == nil || used.Before(before) || used.After(time.Now()) {
				t.Errorf("last_use_time = %v, want the callback's login", c.GetLastUseTime())
			}
			if _, err := a.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "wialon-main"}); err != nil {
				t.Fatalf("IssueSession on the connected credential: %v", err)
			}
			// The stored token is the one Wialon issued: once Wialon forgets
			// that token, the stored credential is rejected.
			w.sim.RemoveWialonToken(token)
			v, err := a.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: "wialon-main"})
			if err != nil || v.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED {
				t.Fatalf("ValidateCredential after Wialon forgot the token = %v, %v; want REJECTED", v, err)
			}

			// The same callback again: the state worked once.
			if again := get(t, cb.String()); again.status != http.StatusBadRequest || again.location != "" {
				t.Errorf("replayed callback: %d %q, want 400 and no redirect", again.status, again.location)
			}
			if c2, _ := a.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "wialon-main"}); c2.GetCredential().GetVersion() != 1 {
				t.Errorf("the replay changed the credential: version %d", c2.GetCredential().GetVersion())
			}

			// Events: CREATED, then EXPIRING (a one-day token is within the
			// 14-day warning at once), seen on the other replica.
			for _, want := range []credentialsv1.CredentialEventType{credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_CREATED, credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_EXPIRING} {
				ev, err := watch.Recv()
				if err != nil {
					t.Fatal(err)
				}
				e := ev.GetEvent()
				if e.GetType() != want || e.GetCredentialId() != "wialon-main" || e.GetProvider() != credentialsv1.Provider_PROVIDER_WIALON || !e.GetTokenExpireTime().AsTime().Equal(expire) {
					t.Errorf("event %v, want %v of wialon-main expiring %v", e, want, expire)
				}
			}

			// The audit trail has the callback, in the name of the starter.
			var intents, outcomes int
			for _, ev := range w.callbackRecords(t) {
				if ev.Method != credentials.CallbackAuditMethod {
					continue
				}
				switch {
				case ev.Phase == audit.PhaseIntent && ev.Principal == principalAcme && ev.TenantID == "acme" && ev.CredentialID == "wialon-main":
					intents++
				case ev.Phase == audit.PhaseOutcome && ev.Result == audit.ResultOK && ev.Principal == principalAcme && ev.Code == "OK":
					outcomes++
				}
			}
			if intents != 1 || outcomes != 1 {
				t.Errorf("audit: %d intents and %d ok outcomes of the callback by %s, want 1 each:\n%s", intents, outcomes, principalAcme, w.audit)
			}

			w.assertNoLeak(t, reg, token, state)
		})
	}
}

// TestWialonAuthorizationRefusals: every bad callback gets a clear page or
// a redirect with status=denied|error, and stores nothing.
func TestWialonAuthorizationRefusals(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[0])
	r := w.start(replicaOptions{})
	ctx := context.Background()
	token71 := canaryToken[:71]
	nonAlnum := canaryToken[:71] + "-"

	// callbackWith starts a flow, has Wialon approve it, and lets change
	// rewrite the callback URL before the browser follows it.
	callbackWith := func(t *testing.T, credential string, change func(cb *url.URL)) hop {
		resp := startAuthorization(t, r, w, "acme", credential, 0)
		cb, err := url.Parse(approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil))
		if err != nil {
			t.Fatal(err)
		}
		change(cb)
		return get(t, cb.String())
	}
	setQuery := func(kv ...string) func(*url.URL) {
		return func(cb *url.URL) {
			q := url.Values{}
			for i := 0; i < len(kv); i += 2 {
				q.Add(kv[i], kv[i+1])
			}
			cb.RawQuery = q.Encode()
		}
	}
	tests := []struct {
		name       string
		do         func(t *testing.T, credential string) hop
		wantStatus string // the return URL's status; "" means an error page
		wantReason string // the audit outcome's reason
	}{
		{"missing token", func(t *testing.T, id string) hop { return callbackWith(t, id, setQuery("user_name", "x")) }, credentials.StatusError, credentials.ReasonTokenInvalid},
		{"71-character token", func(t *testing.T, id string) hop {
			return callbackWith(t, id, setQuery("access_token", token71))
		}, credentials.StatusError, credentials.ReasonTokenInvalid},
		{"token with a dash", func(t *testing.T, id string) hop {
			return callbackWith(t, id, setQuery("access_token", nonAlnum))
		}, credentials.StatusError, credentials.ReasonTokenInvalid},
		{"two tokens", func(t *testing.T, id string) hop {
			return callbackWith(t, id, setQuery("access_token", canaryToken, "access_token", canaryToken))
		}, credentials.StatusError, credentials.ReasonTokenInvalid},
		{"token Wialon rejects", func(t *testing.T, id string) hop {
			return callbackWith(t, id, setQuery("access_token", strings.Repeat("Z", 72)))
		}, credentials.StatusError, "CREDENTIAL_REJECTED"},
		{"svc_error", func(t *testing.T, id string) hop {
			return callbackWith(t, id, setQuery("svc_error", "7", "access_token", canaryToken))
		}, credentials.StatusDenied, credentials.ReasonAuthorizationDenied},
		{"customer pressed Deny", func(t *testing.T, id string) hop {
			resp := startAuthorization(t, r, w, "acme", id, 0)
			return get(t, approveAtWialon(t, resp.GetAuthorizeUrl(), "deny", nil))
		}, credentials.StatusDenied, credentials.ReasonAuthorizationDenied},
		{"forged state", func(t *testing.T, id string) hop {
			return callbackWith(t, id, func(cb *url.URL) { cb.Path = "/wialon/callback/" + strings.Repeat("A", 43) })
		}, "", credentials.ReasonStateInvalid},
		{"malformed state", func(t *testing.T, id string) hop {
			return callbackWith(t, id, func(cb *url.URL) { cb.Path = "/wialon/callback/short" })
		}, "", credentials.ReasonStateInvalid},
		{"expired state", func(t *testing.T, id string) hop {
			resp := startAuthorization(t, r, w, "acme", id, 0)
			cb := approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil)
			w.clock.Advance(credentials.StateTTL + time.Second)
			defer w.clock.Advance(-credentials.StateTTL - time.Second)
			return get(t, cb)
		}, "", credentials.ReasonStateInvalid},
		{"rights widened on Wialon's page", func(t *testing.T, id string) hop {
			resp := startAuthorization(t, r, w, "acme", id, 0)
			return get(t, approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", func(q url.Values) { q.Set("access_type", "-1") }))
		}, credentials.StatusError, credentials.ReasonTokenRightsExceeded},
		{"principal lost the right since the start", func(t *testing.T, id string) hop {
			resp := startAuthorization(t, r, w, "acme", id, 0)
			cb := approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil)
			w.authz.deny(principalAcme, "acme")
			defer func() { w.authz.mu.Lock(); delete(w.authz.denied, principalAcme+"|acme"); w.authz.mu.Unlock() }()
			return get(t, cb)
		}, credentials.StatusError, "PERMISSION_DENIED"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := "refused-" + string(rune('a'+i))
			auditBefore := len(w.callbackRecords(t))
			got := tc.do(t, id)
			switch tc.wantStatus {
			case "":
				if got.status != http.StatusBadRequest || got.location != "" || !strings.Contains(got.body, "no longer works") {
					t.Errorf("got %d %q, want the 400 error page", got.status, got.location)
				}
			default:
				ret, err := url.Parse(got.location)
				if err != nil || got.status != http.StatusSeeOther || ret.Query().Encode() != "credential_id="+id+"&status="+tc.wantStatus {
					t.Errorf("got %d to %q, want a redirect with status=%s", got.status, got.location, tc.wantStatus)
				}
			}
			if got.header.Get("Referrer-Policy") != "no-referrer" || got.header.Get("Cache-Control") != "no-store" {
				t.Errorf("headers %v", got.header)
			}
			_, err := r.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: id})
			wantCode(t, err, codes.NotFound)
			var reasons []string
			for _, ev := range w.callbackRecords(t)[auditBefore:] {
				if ev.Phase == audit.PhaseOutcome && ev.Method == credentials.CallbackAuditMethod {
					reasons = append(reasons, ev.Reason)
				}
			}
			if len(reasons) != 1 || reasons[0] != tc.wantReason {
				t.Errorf("audit outcomes %v, want one with reason %s", reasons, tc.wantReason)
			}
		})
	}
	w.assertNoLeak(t, nil, canaryToken, token71)
}

// TestWialonAuthorizationLoginsGoThroughTheLoginGuard: the callback's
// login with the token Wialon sent is a credentials-service login like any
// other: a token Wialon refused is remembered, for every replica, and not
// tried again (each try would count against the egress IP's 10 failed
// logins a minute).
func TestWialonAuthorizationLoginsGoThroughTheLoginGuard(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[0])
	a, b := w.start(replicaOptions{}), w.start(replicaOptions{})
	refused := strings.Repeat("R", 72) // a token Wialon does not know
	for i, r := range []*replica{a, b, a} {
		resp := startAuthorization(t, r, w, "acme", "guarded", 0)
		cb, err := url.Parse(approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil))
		if err != nil {
			t.Fatal(err)
		}
		cb.RawQuery = url.Values{"access_token": {refused}}.Encode()
		got := get(t, cb.String())
		ret, err := url.Parse(got.location)
		if err != nil || ret.Query().Get("status") != credentials.StatusError {
			t.Fatalf("callback %d: %d to %q, want status=error", i, got.status, got.location)
		}
	}
	if n := w.sim.Stats().WialonFailedLogins; n != 1 {
		t.Errorf("Wialon saw %d failed logins for three callbacks with one refused token on two replicas, want 1", n)
	}
	w.assertNoLeak(t, nil, refused)
}

// TestWialonAuthorizationReturnURLChecked: a return URL off the allow-list
// is refused at the start (the field named), and one removed from it
// before the callback (another replica's configuration) sends the browser
// nowhere.
func TestWialonAuthorizationReturnURLChecked(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	r := w.start(replicaOptions{})
	for _, bad := range []string{
		"https://evil.example/settings", w.returnSrv.URL + "/admin", w.returnSrv.URL + "/settings/../admin",
		"javascript:alert(1)", w.returnSrv.URL + "/settings//x",
	} {
		_, err := r.creds.StartWialonAuthorization(as(principalAcme), &credentialsv1.StartWialonAuthorizationRequest{
			TenantId: "acme", CredentialId: "x", ReturnUrl: bad, BaseUrl: w.simURL})
		st := wantCode(t, err, codes.InvalidArgument)
		if f := badRequestFields(st); len(f) != 1 || f[0] != "return_url" {
			t.Errorf("%s: fields %v, want return_url", bad, f)
		}
	}
	narrow := w.start(replicaOptions{returnURLs: "https://elsewhere.example"})
	resp := startAuthorization(t, r, w, "acme", "x", 0)
	cb, err := url.Parse(approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil))
	if err != nil {
		t.Fatal(err)
	}
	cb.Host = strings.TrimPrefix(narrow.publicURL, "http://")
	got := get(t, cb.String())
	if got.status != http.StatusBadRequest || got.location != "" {
		t.Errorf("got %d %q, want an error page and no redirect", got.status, got.location)
	}
	_, err = r.creds.GetCredential(context.Background(), &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "x"})
	wantCode(t, err, codes.NotFound)
	w.assertNoLeak(t, nil, cb.Query().Get("access_token"))
}

// TestStartWialonAuthorizationRefusals: the flow's inputs are checked at
// the start.
func TestStartWialonAuthorizationRefusals(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	r := w.start(replicaOptions{})
	off := w.start(replicaOptions{noConnect: true})
	req := func(change func(*credentialsv1.StartWialonAuthorizationRequest)) *credentialsv1.StartWialonAuthorizationRequest {
		q := &credentialsv1.StartWialonAuthorizationRequest{TenantId: "acme", CredentialId: "x", ReturnUrl: w.returnURL(), BaseUrl: w.simURL}
		change(q)
		return q
	}
	for _, tc := range []struct {
		name  string
		r     *replica
		req   *credentialsv1.StartWialonAuthorizationRequest
		code  codes.Code
		field string
	}{
		{"not configured", off, req(func(*credentialsv1.StartWialonAuthorizationRequest) {}), codes.FailedPrecondition, ""},
		{"base URL not allowed", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) { q.BaseUrl = "https://169.254.169.254" }), codes.InvalidArgument, "base_url"},
		{"duration over 100 days", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) {
			q.Duration = durationpb.New(wialon.MaxTokenDuration + time.Second)
		}), codes.InvalidArgument, "duration"},
		{"negative duration", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) { q.Duration = durationpb.New(-time.Second) }), codes.InvalidArgument, "duration"},
		{"fractional duration", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) {
			q.Duration = durationpb.New(1500 * time.Millisecond)
		}), codes.InvalidArgument, "duration"},
		{"no return URL", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) { q.ReturnUrl = "" }), codes.InvalidArgument, "return_url"},
		{"bad credential id", r, req(func(q *credentialsv1.StartWialonAuthorizationRequest) { q.CredentialId = "a:b" }), codes.InvalidArgument, "credential_id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.r.creds.StartWialonAuthorization(as(principalAcme), tc.req)
			st := wantCode(t, err, tc.code)
			if f := badRequestFields(st); tc.field != "" && (len(f) != 1 || f[0] != tc.field) {
				t.Errorf("fields %v, want %s", f, tc.field)
			}
		})
	}
	// Exactly 100 days is Wialon's maximum, and allowed.
	if _, err := r.creds.StartWialonAuthorization(as(principalAcme), req(func(q *credentialsv1.StartWialonAuthorizationRequest) {
		q.Duration = durationpb.New(wialon.MaxTokenDuration)
	})); err != nil {
		t.Errorf("100 days: %v", err)
	}
}

// TestWialonAuthorizationFullAccess: where the operator allows -1, the
// login page asks for it and the expiry comes from Wialon's token/list.
func TestWialonAuthorizationFullAccess(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	r := w.start(replicaOptions{accessType: "-1", allowFullAccess: true})
	resp := startAuthorization(t, r, w, "acme", "full", 3*24*time.Hour)
	u, _ := url.Parse(resp.GetAuthorizeUrl())
	if u.Query().Get("access_type") != "-1" {
		t.Errorf("access_type %q, want -1", u.Query().Get("access_type"))
	}
	got := get(t, approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil))
	if !strings.Contains(got.location, "status=connected") {
		t.Fatalf("got %d %q", got.status, got.location)
	}
	cred, err := r.creds.GetCredential(context.Background(), &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "full"})
	if err != nil {
		t.Fatal(err)
	}
	// token/list reports whole seconds.
	if exp := cred.GetCredential().GetTokenExpireTime().AsTime(); exp.Nanosecond() != 0 || time.Until(exp) < 3*24*time.Hour-time.Minute || time.Until(exp) > 3*24*time.Hour {
		t.Errorf("token_expire_time %v, want Wialon's at + dur, three days away", exp)
	}
}

// TestConnectConfigChecks: the operator's settings are checked at start.
func TestConnectConfigChecks(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	list, err := credentials.ParseReturnURLs("https://app.example.com")
	if err != nil {
		t.Fatal(err)
	}
	good := credentials.ConnectConfig{Client: w.client, PublicURL: "https://connect.example.com", ReturnURLs: list}
	for name, change := range map[string]func(*credentials.ConnectConfig){
		"-1 without allow":      func(c *credentials.ConnectConfig) { c.AccessType = "-1" },
		"unknown rights":        func(c *credentials.ConnectConfig) { c.AccessType = "0x4000" },
		"negative rights":       func(c *credentials.ConnectConfig) { c.AccessType = "-2" },
		"rights not a number":   func(c *credentials.ConnectConfig) { c.AccessType = "all" },
		"no return URLs":        func(c *credentials.ConnectConfig) { c.ReturnURLs = &credentials.ReturnURLs{} },
		"no public URL":         func(c *credentials.ConnectConfig) { c.PublicURL = "" },
		"http public URL":       func(c *credentials.ConnectConfig) { c.PublicURL = "http://connect.example.com" },
		"public URL with query": func(c *credentials.ConnectConfig) { c.PublicURL = "https://connect.example.com/?a=b" },
		"no Redis":              func(c *credentials.ConnectConfig) { c.Client = nil },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := good
			change(&cfg)
			if _, err := credentials.New(w.serviceConfig(&cfg)); err == nil {
				t.Error("accepted")
			}
		})
	}
	if _, err := credentials.New(w.serviceConfig(&good)); err != nil {
		t.Errorf("good config: %v", err)
	}
	for _, rights := range []string{"0x100", "256", "0x300"} {
		cfg := good
		cfg.AccessType = rights
		if _, err := credentials.New(w.serviceConfig(&cfg)); err != nil {
			t.Errorf("rights %s: %v", rights, err)
		}
	}
	full := good
	full.AccessType, full.AllowFullAccess = "-1", true
	if _, err := credentials.New(w.serviceConfig(&full)); err != nil {
		t.Errorf("rights -1 allowed: %v", err)
	}
}

func TestReturnURLs(t *testing.T) {
	list, err := credentials.ParseReturnURLs("https://app.example.com/settings, http://localhost:3000, https://other.example.com:8443")
	if err != nil {
		t.Fatal(err)
	}
	for raw, ok := range map[string]bool{
		"https://app.example.com/settings":                  true,
		"https://app.example.com/settings/wialon?tab=2#top": true,
		"https://APP.example.com:443/settings/x":            true,
		"https://app.example.com/settingsX":                 false,
		"https://app.example.com/":                          false,
		"http://app.example.com/settings":                   false,
		"https://app.example.com.evil.com/settings":         false,
		"https://user@app.example.com/settings":             false,
		"https://app.example.com/settings/../admin":         false,
		"https://app.example.com/settings/%2e%2e/admin":     false,
		"https://app.example.com/settings%2F..%2Fadmin":     false,
		`https://app.example.com/settings\..\admin`:         false,
		"https://app.example.com/settings//evil.com":        false,
		"http://localhost:3000/anything":                    true,
		"http://localhost:3001/":                            false,
		"https://other.example.com:8443/x":                  true,
		"https://other.example.com/x":                       false,
		"/settings":                                         false,
		"javascript:alert(1)":                               false,
	} {
		_, err := list.Check(raw)
		if (err == nil) != ok {
			t.Errorf("Check(%q) = %v, want allowed %v", raw, err, ok)
		}
	}
	for _, bad := range []string{"http://app.example.com", "https://app.example.com/?a=b", "app.example.com", "https://u:p@app.example.com"} {
		if _, err := credentials.ParseReturnURLs(bad); err == nil {
			t.Errorf("ParseReturnURLs(%q) accepted", bad)
		}
	}
}

// TestCallbackRoutes: only GET /wialon/callback/<state> is the callback;
// anything else is a plain error page, never a redirect (net/http's
// ServeMux would redirect a path with dot segments to its cleaned form,
// query and token included).
func TestCallbackRoutes(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	r := w.start(replicaOptions{})
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/wialon/callback/../../x?access_token=" + canaryToken, http.StatusNotFound},
		{http.MethodGet, "/wialon/callback/./" + strings.Repeat("A", 43) + "?access_token=" + canaryToken, http.StatusNotFound},
		{http.MethodGet, "/wialon//callback/" + strings.Repeat("A", 43) + "?access_token=" + canaryToken, http.StatusNotFound},
		{http.MethodPost, "/wialon/callback/" + strings.Repeat("A", 43) + "?access_token=" + canaryToken, http.StatusMethodNotAllowed},
		{http.MethodGet, "/", http.StatusNotFound},
		{http.MethodGet, "/metrics", http.StatusNotFound},
	} {
		req, err := http.NewRequest(tc.method, r.publicURL+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := noRedirects.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want || resp.Header.Get("Location") != "" || resp.Header.Get("Referrer-Policy") != "no-referrer" {
			t.Errorf("%s %s: %d, Location %q; want %d, no redirect, no referrer", tc.method, tc.path, resp.StatusCode, resp.Header.Get("Location"), tc.want)
		}
	}
	w.assertNoLeak(t, nil, canaryToken)
}
