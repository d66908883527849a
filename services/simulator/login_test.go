package simulator

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// approve posts login.html's form the way a browser does after "Allow" (or
// "Deny") and returns where it redirects.
func approve(t *testing.T, srvURL, action string, params url.Values) *url.URL {
	t.Helper()
	form := url.Values{"action": {action}, "login": {"fleet_manager"}, "passw": {"x"}}
	for k, v := range params {
		form[k] = v
	}
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.PostForm(srvURL+"/login.html", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("login.html answered %d %s, want a redirect", resp.StatusCode, b)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	return loc
}

func tokenList(t *testing.T, srvURL, sid string) (list []map[string]any, werr int) {
	t.Helper()
	resp, err := http.PostForm(srvURL+"/wialon/ajax.html", url.Values{"svc": {"token/list"}, "params": {"{}"}, "sid": {sid}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if json.Unmarshal(b, &list) == nil {
		return list, 0
	}
	var e struct{ Error int }
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("token/list reply %s", b)
	}
	return nil, e.Error
}

var tokenPattern = regexp.MustCompile(`^[0-9a-f]{72}$`)

// TestLoginPage: login.html shows a form that carries the application's
// parameters, and approving it redirects to redirect_uri with a new
// 72-character token that logs in, as Wialon's does.
func TestLoginPage(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Now: clk.Now})
	params := url.Values{
		"client_id": {"fleetbroker"}, "access_type": {"0x100"}, "activation_time": {"0"}, "duration": {"86400"},
		"flags": {"0x1"}, "redirect_uri": {"https://broker.example/wialon/callback/STATE?keep=1"}, "response_type": {"token"},
	}
	resp, err := http.Get(srv.URL + "/login.html?" + params.Encode())
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`<form method="post" action="login.html">`, `name="redirect_uri" value="https://broker.example/wialon/callback/STATE?keep=1"`, `value="allow"`, `value="deny"`, "fleetbroker"} {
		if !strings.Contains(string(page), want) {
			t.Errorf("login page lacks %q:\n%s", want, page)
		}
	}

	loc := approve(t, srv.URL, "allow", params)
	q := loc.Query()
	token := q.Get("access_token")
	if loc.Host != "broker.example" || loc.Path != "/wialon/callback/STATE" || q.Get("keep") != "1" || !tokenPattern.MatchString(token) || q.Get("user_name") != "fleet_manager" {
		t.Fatalf("redirected to %s", loc)
	}
	sid := login(t, srv, token)
	if _, werr := tokenList(t, srv.URL, sid); werr != wErrAccessDenied {
		t.Errorf("token/list with a 0x100 token: error %d, want %d (only -1 tokens manage tokens)", werr, wErrAccessDenied)
	}

	// Past its duration the token no longer logs in.
	clk.Advance(24 * time.Hour)
	if r := wialon(t, srv, "token/login", `{"token":"`+token+`"}`, ""); wialonErr(r) != wErrBadCredentials {
		t.Errorf("login with an expired token: %v, want error %d", r, wErrBadCredentials)
	}

	// A token with unlimited rights lists the user's tokens, itself included.
	params.Set("access_type", "-1")
	full := approve(t, srv.URL, "allow", params).Query().Get("access_token")
	list, werr := tokenList(t, srv.URL, login(t, srv, full))
	if werr != 0 {
		t.Fatalf("token/list with a -1 token: error %d", werr)
	}
	var listed bool
	for _, e := range list {
		if e["h"] == full {
			listed = e["fl"] == float64(-1) && e["dur"] == float64(86400) && e["app"] == "fleetbroker" && e["at"] == float64(clk.Now().Unix())
		}
	}
	if !listed || len(list) != 2 {
		t.Errorf("token/list = %v, want both tokens of fleet_manager, the new one with its rights and duration", list)
	}
}

func TestLoginPageRefusals(t *testing.T) {
	_, srv := start(t, Config{})
	base := url.Values{"client_id": {"x"}, "redirect_uri": {"https://broker.example/cb"}, "response_type": {"token"}, "flags": {"0x1"}}
	with := func(k, v string) url.Values {
		p := url.Values{}
		for key, vals := range base {
			p[key] = vals
		}
		p.Set(k, v)
		return p
	}
	for name, tc := range map[string]struct {
		action string
		params url.Values
		want   string
	}{
		"deny":              {"deny", base, "7"},
		"duration too long": {"allow", with("duration", "8640001"), "4"},
		"bad access type":   {"allow", with("access_type", "zero"), "4"},
		"hash response":     {"allow", with("response_type", "hash"), "4"},
	} {
		t.Run(name, func(t *testing.T) {
			q := approve(t, srv.URL, tc.action, tc.params).Query()
			if q.Get("svc_error") != tc.want || q.Has("access_token") {
				t.Errorf("redirect query %v, want svc_error=%s and no token", q, tc.want)
			}
		})
	}
	resp, err := http.PostForm(srv.URL+"/login.html", url.Values{"action": {"allow"}, "redirect_uri": {"/relative"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("relative redirect_uri: HTTP %d, want 400", resp.StatusCode)
	}
}
