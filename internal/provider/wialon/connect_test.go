package wialon_test

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// connector is Wialon's provider.Connector, as the credentials service
// finds it in the registry.
func connector(t *testing.T) provider.Connector {
	t.Helper()
	p := wialon.NewProvider(provider.Env{HTTPClient: func(string) *http.Client { return &http.Client{Timeout: 5 * time.Second} }})
	c, ok := p.(provider.Connector)
	if !ok {
		t.Fatal("the Wialon provider does not implement provider.Connector")
	}
	return c
}

// TestParseRights: the operator's access_type is read as Wialon writes it,
// defaults to online tracking, and -1 or unknown bits are refused unless
// allowed.
func TestParseRights(t *testing.T) {
	c := connector(t)
	for _, tc := range []struct {
		in       string
		allowAll bool
		want     string
		wantErr  string
	}{
		{in: "", want: "0x100"},
		{in: "0x100", want: "0x100"},
		{in: "256", want: "0x100"},
		{in: " 0x300 ", want: "0x300"},
		{in: "768", want: "0x300"},
		{in: "-1", allowAll: true, want: "-1"},
		{in: "-1", wantErr: "--wialon-allow-full-access"},
		{in: "0x4000", wantErr: "access type"},
		{in: "-2", wantErr: "access type"},
		{in: "0", wantErr: "access type"},
		{in: "all", wantErr: "not a number"},
	} {
		got, err := c.ParseRights(tc.in, tc.allowAll)
		switch {
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("ParseRights(%q, %v) = %q, %v; want an error naming %q", tc.in, tc.allowAll, got, err, tc.wantErr)
		case tc.wantErr == "" && (err != nil || got != tc.want):
			t.Errorf("ParseRights(%q, %v) = %q, %v; want %q", tc.in, tc.allowAll, got, err, tc.want)
		}
	}
}

// TestAuthorizationURL: hosted Wialon uses the configured login page, a
// self-hosted one its own /login.html; every parameter login.html needs is
// there, and nothing else.
func TestAuthorizationURL(t *testing.T) {
	c := connector(t)
	const redirect = "https://connect.example.com/wialon/callback/STATE"
	for _, tc := range []struct {
		name     string
		req      provider.AuthorizationRequest
		wantPage string
		want     url.Values
	}{
		{"hosted, defaults",
			provider.AuthorizationRequest{BaseURL: upstream.DefaultWialonBaseURL, RedirectURI: redirect},
			wialon.DefaultLoginURL,
			url.Values{"client_id": {wialon.DefaultClientID}, "access_type": {"0x100"}, "activation_time": {"0"}, "duration": {"0"},
				"flags": {"0x1"}, "redirect_uri": {redirect}, "response_type": {"token"}}},
		{"hosted, configured page",
			provider.AuthorizationRequest{BaseURL: upstream.DefaultWialonBaseURL + "/", PageURL: "https://hosting.wialon.eu/login.html",
				ClientID: "acme-fleet", Rights: "0x300", Duration: 24 * time.Hour, RedirectURI: redirect},
			"https://hosting.wialon.eu/login.html",
			url.Values{"client_id": {"acme-fleet"}, "access_type": {"0x300"}, "activation_time": {"0"}, "duration": {"86400"},
				"flags": {"0x1"}, "redirect_uri": {redirect}, "response_type": {"token"}}},
		{"self-hosted",
			provider.AuthorizationRequest{BaseURL: "https://wialon.example.com/", PageURL: "https://hosting.wialon.eu/login.html",
				Rights: "-1", Duration: wialon.MaxTokenDuration, RedirectURI: redirect},
			"https://wialon.example.com/login.html",
			url.Values{"client_id": {wialon.DefaultClientID}, "access_type": {"-1"}, "activation_time": {"0"}, "duration": {"8640000"},
				"flags": {"0x1"}, "redirect_uri": {redirect}, "response_type": {"token"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, err := url.Parse(c.AuthorizationURL(tc.req))
			if err != nil {
				t.Fatal(err)
			}
			if page := u.Scheme + "://" + u.Host + u.Path; page != tc.wantPage {
				t.Errorf("page = %s, want %s", page, tc.wantPage)
			}
			if diff := cmp.Diff(tc.want, u.Query()); diff != "" {
				t.Errorf("query (-want +got):\n%s", diff)
			}
		})
	}
}

// TestCallbackSecret: the token comes out of Wialon's redirect only when
// exactly one well-formed token is there; a refusal names Wialon's error
// code and nothing of the query; no error ever holds a token.
func TestCallbackSecret(t *testing.T) {
	c := connector(t)
	q := func(kv ...string) url.Values {
		v := url.Values{}
		for i := 0; i < len(kv); i += 2 {
			v.Add(kv[i], kv[i+1])
		}
		return v
	}
	for _, tc := range []struct {
		name    string
		query   url.Values
		want    *credentialsv1.WialonSecret
		wantErr error
	}{
		{"token", q("access_token", canary, "user_name", "fleet_manager"), &credentialsv1.WialonSecret{Token: canary}, nil},
		{"denied", q("svc_error", "7"), nil, provider.ErrAuthorizationDenied},
		{"denied with a token", q("svc_error", "7", "access_token", canary), nil, provider.ErrAuthorizationDenied},
		{"no token", q("user_name", "fleet_manager"), nil, provider.ErrNoCallbackSecret},
		{"two tokens", q("access_token", canary, "access_token", otherToken), nil, provider.ErrNoCallbackSecret},
		{"short token", q("access_token", canary[:71]), nil, provider.ErrNoCallbackSecret},
		{"not letters and digits", q("access_token", canary[:71]+"-"), nil, provider.ErrNoCallbackSecret},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.CallbackSecret(tc.query)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil && (strings.Contains(err.Error(), canary[:20]) || strings.Contains(err.Error(), otherToken[:20])) {
				t.Errorf("the error quotes a token: %v", err)
			}
			if tc.want != nil {
				if diff := cmp.Diff(tc.want, got, protocmp.Transform()); diff != "" {
					t.Errorf("secret (-want +got):\n%s", diff)
				}
			}
		})
	}
}

// TestInspect: a token with token-management rights reads its own record
// (expiry and rights, compared with what was asked); a least-privilege
// token is only logged in with; a bad token is rejected. Every inspection
// logs out again.
func TestInspect(t *testing.T) {
	sim, srv := startSim(t, simulator.Config{Units: 1})
	c := connector(t)
	ctx := context.Background()
	// approve plays the customer on the simulator's login.html.
	approve := func(accessType string, duration time.Duration) string {
		t.Helper()
		form := url.Values{"client_id": {"fleetbroker"}, "access_type": {accessType}, "duration": {strconv.FormatInt(int64(duration/time.Second), 10)},
			"flags": {"0x1"}, "response_type": {"token"}, "redirect_uri": {"https://connect.example.com/cb"}, "action": {"allow"}, "login": {"fleet_manager"}}
		noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := noRedirect.PostForm(srv.URL+"/login.html", form)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		loc, err := url.Parse(resp.Header.Get("Location"))
		if err != nil || resp.StatusCode != http.StatusFound {
			t.Fatalf("login.html: %d %v", resp.StatusCode, err)
		}
		return loc.Query().Get("access_token")
	}
	full := approve("-1", 24*time.Hour)
	tracking := approve("0x100", 24*time.Hour)
	for _, tc := range []struct {
		name        string
		token       string
		asked       string
		wantKnown   bool
		wantExceeds bool
		wantExpiry  bool
		wantKind    upstream.Kind
	}{
		{name: "full rights, asked for tracking", token: full, asked: "0x100", wantKnown: true, wantExceeds: true, wantExpiry: true},
		{name: "full rights, asked for full", token: full, asked: "-1", wantKnown: true, wantExpiry: true},
		{name: "unlimited demo token", token: simulator.DemoWialonToken, asked: "0x300", wantKnown: true, wantExceeds: true},
		{name: "least privilege", token: tracking, asked: "0x100"},
		{name: "unknown token", token: canary, asked: "0x100", wantKind: upstream.KindRejected},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := time.Now()
			g, err := c.Inspect(ctx, srv.URL, &credentialsv1.WialonSecret{Token: tc.token}, tc.asked)
			if tc.wantKind != 0 {
				if upstream.KindOf(err) != tc.wantKind || strings.Contains(err.Error(), tc.token[:20]) {
					t.Fatalf("err = %v, want kind %v without the token", err, tc.wantKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if g.User == "" || g.Known != tc.wantKnown || g.ExceedsRights != tc.wantExceeds || g.Expires.IsZero() == tc.wantExpiry {
				t.Errorf("grant = %+v; want known %v, exceeds %v, expiry %v", g, tc.wantKnown, tc.wantExceeds, tc.wantExpiry)
			}
			if tc.wantExpiry && (g.Expires.Before(before.Add(24*time.Hour-time.Minute)) || g.Expires.After(before.Add(24*time.Hour+time.Minute))) {
				t.Errorf("expires %v, want about a day from now", g.Expires)
			}
		})
	}
	if st := sim.Stats(); st.ActiveWialonSessions != 0 || st.WialonLogouts != st.WialonLogins {
		t.Errorf("after inspection: %d Wialon sessions open, %d logins, %d logouts", st.ActiveWialonSessions, st.WialonLogins, st.WialonLogouts)
	}
}
