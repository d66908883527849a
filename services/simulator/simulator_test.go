package simulator

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"
)

// clock is a settable time source shared with the simulator.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func start(t *testing.T, cfg Config) (*Simulator, *httptest.Server) {
	t.Helper()
	sim := New(cfg)
	srv := httptest.NewServer(sim.Handler())
	t.Cleanup(srv.Close)
	return sim, srv
}

func wialon(t *testing.T, srv *httptest.Server, svc, params, sid string) map[string]any {
	t.Helper()
	form := url.Values{"svc": {svc}, "params": {params}}
	if sid != "" {
		form.Set("sid", sid)
	}
	resp, err := http.PostForm(srv.URL+"/wialon/ajax.html", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: HTTP %d", svc, resp.StatusCode)
	}
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("%s: %v", svc, err)
	}
	return out
}

func wialonErr(m map[string]any) int {
	if e, ok := m["error"].(float64); ok {
		return int(e)
	}
	return 0
}

func login(t *testing.T, srv *httptest.Server, token string) string {
	t.Helper()
	r := wialon(t, srv, "token/login", `{"token":"`+token+`","fl":1}`, "")
	sid, _ := r["eid"].(string)
	if sid == "" {
		t.Fatalf("login failed: %v", r)
	}
	return sid
}

type fuReply struct {
	status int
	header http.Header
	body   []byte
}

func fleetup(t *testing.T, srv *httptest.Server, path, apiKey, jwt, body string) fuReply {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if apiKey != "" {
		req.Header.Set("x-api-key", apiKey)
	}
	if jwt != "" {
		req.Header.Set("Authorization", "Bearer "+jwt)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return fuReply{resp.StatusCode, resp.Header, b}
}

func mint(t *testing.T, srv *httptest.Server, apiKey string, acct int64, secret string) string {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"acctId": acct, "secret": secret})
	r := fleetup(t, srv, "/token", apiKey, "", string(body))
	if r.status != http.StatusOK {
		t.Fatalf("mint: HTTP %d %s", r.status, r.body)
	}
	var out struct{ Token string }
	if err := json.Unmarshal(r.body, &out); err != nil || out.Token == "" {
		t.Fatalf("mint reply %s: %v", r.body, err)
	}
	return out.Token
}

func TestDemoCredentials(t *testing.T) {
	if len(DemoWialonToken) != 72 {
		t.Errorf("DemoWialonToken has %d characters, want 72", len(DemoWialonToken))
	}
	for _, r := range DemoWialonToken {
		if r > unicode.MaxASCII || !(unicode.IsLetter(r) || unicode.IsDigit(r)) {
			t.Fatalf("DemoWialonToken has non-alphanumeric %q", r)
		}
	}
	_, srv := start(t, Config{Demo: true})
	login(t, srv, DemoWialonToken)
	mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)

	_, bare := start(t, Config{})
	if e := wialonErr(wialon(t, bare, "token/login", `{"token":"`+DemoWialonToken+`"}`, "")); e != 8 {
		t.Errorf("demo token accepted without Demo: error %d", e)
	}
}

func TestWialonLoginCounting(t *testing.T) {
	sim, srv := start(t, Config{})
	tokA, tokB := strings.Repeat("a", 72), strings.Repeat("b", 72)
	sim.AddWialonToken(tokA)
	sim.AddWialonToken(tokB)

	login(t, srv, tokA)
	login(t, srv, tokA)
	login(t, srv, tokB)
	r := wialon(t, srv, "token/login", `{"token":"`+strings.Repeat("c", 72)+`"}`, "")
	if e := wialonErr(r); e != 8 {
		t.Errorf("unknown token: error %d, want 8", e)
	}

	st := sim.Stats()
	if st.WialonLogins != 3 {
		t.Errorf("WialonLogins = %d, want 3 (failed logins are not sessions)", st.WialonLogins)
	}
	if got := st.WialonLoginsByToken[Fingerprint(tokA)]; got != 2 {
		t.Errorf("logins for token A = %d, want 2", got)
	}
	if got := st.Requests["wialon token/login"]; got != 4 {
		t.Errorf("token/login requests = %d, want 4", got)
	}
	if st.ActiveWialonSessions != 3 {
		t.Errorf("ActiveWialonSessions = %d, want 3", st.ActiveWialonSessions)
	}
}

func TestWialonLoginReply(t *testing.T) {
	_, srv := start(t, Config{Demo: true})
	r := wialon(t, srv, "token/login", `{"token":"`+DemoWialonToken+`","fl":1}`, "")
	if r["au"] == "" || r["au"] == nil {
		t.Errorf("login reply lacks au: %v", r)
	}
	user, _ := r["user"].(map[string]any)
	if user == nil || user["nm"] != r["au"] {
		t.Errorf("login reply user = %v, want nm = au", r["user"])
	}
}

func TestWialonSessionLifecycle(t *testing.T) {
	const search = `{"spec":{"itemsType":"avl_unit","propName":"sys_name","propValueMask":"*","sortType":"sys_name"},"force":1,"flags":1025,"from":0,"to":0}`
	clk := newClock()
	sim, srv := start(t, Config{Demo: true, Now: clk.Now, WialonIdleTimeout: 5 * time.Minute})

	t.Run("idle timeout", func(t *testing.T) {
		sid := login(t, srv, DemoWialonToken)
		clk.Advance(4 * time.Minute)
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 0 {
			t.Fatalf("active session refused: error %d", e)
		}
		clk.Advance(4 * time.Minute) // 8 min since login, 4 since last use
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 0 {
			t.Fatalf("use should have refreshed the idle timer: error %d", e)
		}
		clk.Advance(5*time.Minute + time.Second)
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 1 {
			t.Fatalf("idle session: error %d, want 1", e)
		}
	})
	t.Run("expire all", func(t *testing.T) {
		sid := login(t, srv, DemoWialonToken)
		sim.ExpireWialonSessions()
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 1 {
			t.Fatalf("expired session: error %d, want 1", e)
		}
	})
	t.Run("expire over http", func(t *testing.T) {
		sid := login(t, srv, DemoWialonToken)
		resp, err := http.Post(srv.URL+"/sim/expire-wialon-sessions", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 1 {
			t.Fatalf("expired session: error %d, want 1", e)
		}
	})
	t.Run("logout", func(t *testing.T) {
		sid := login(t, srv, DemoWialonToken)
		r := wialon(t, srv, "core/logout", `{}`, sid)
		if _, ok := r["error"]; !ok || wialonErr(r) != 0 {
			t.Fatalf("logout reply %v, want {\"error\":0}", r)
		}
		if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 1 {
			t.Fatalf("after logout: error %d, want 1", e)
		}
		if sim.Stats().WialonLogouts != 1 {
			t.Errorf("WialonLogouts = %d, want 1", sim.Stats().WialonLogouts)
		}
	})
	t.Run("unknown sid", func(t *testing.T) {
		if e := wialonErr(wialon(t, srv, "core/search_items", search, "nope")); e != 1 {
			t.Fatalf("unknown sid: error %d, want 1", e)
		}
	})
}

func TestWialonUnitsMove(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 7})
	sid := login(t, srv, DemoWialonToken)
	search := func(flags int) []any {
		params := `{"spec":{"itemsType":"avl_unit","propName":"sys_name","propValueMask":"*","sortType":"sys_name"},"force":1,"flags":` +
			itoa(flags) + `,"from":0,"to":0}`
		r := wialon(t, srv, "core/search_items", params, sid)
		items, _ := r["items"].([]any)
		if len(items) != 7 || r["totalItemsCount"].(float64) != 7 {
			t.Fatalf("search reply: %v", r)
		}
		return items
	}
	if _, hasPos := search(1)[0].(map[string]any)["pos"]; hasPos {
		t.Error("pos returned without flag 0x400")
	}
	before := search(0x401)
	clk.Advance(2 * time.Hour)           // past any parking period
	sid = login(t, srv, DemoWialonToken) // the old session idled out meanwhile
	after := search(0x401)
	moved := 0
	for i := range before {
		b := before[i].(map[string]any)["pos"].(map[string]any)
		a := after[i].(map[string]any)["pos"].(map[string]any)
		if a["t"].(float64)-b["t"].(float64) != 7200 {
			t.Errorf("unit %d: pos.t advanced by %v, want 7200", i, a["t"].(float64)-b["t"].(float64))
		}
		if a["x"] != b["x"] || a["y"] != b["y"] {
			moved++
		}
		for _, k := range []string{"t", "y", "x", "z", "s", "c", "sc"} {
			if _, ok := a[k]; !ok {
				t.Errorf("pos lacks %q: %v", k, a)
			}
		}
	}
	if moved == 0 {
		t.Error("no unit moved in two hours")
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func TestWialonMessagesAndTrips(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 3})
	sid := login(t, srv, DemoWialonToken)
	from := clk.Now().Add(-3 * time.Hour).Unix()
	to := clk.Now().Unix()

	r := wialon(t, srv, "messages/load_interval",
		`{"itemId":10001,"timeFrom":`+itoa(int(from))+`,"timeTo":`+itoa(int(to))+`,"flags":1,"flagsMask":65281,"loadCount":10}`, sid)
	if r["count"].(float64) != 181 {
		t.Errorf("count = %v, want 181 (one per minute, both ends)", r["count"])
	}
	msgs := r["messages"].([]any)
	if len(msgs) != 10 {
		t.Fatalf("got %d messages, want loadCount 10", len(msgs))
	}
	m0 := msgs[0].(map[string]any)
	if m0["t"].(float64) != float64(from) || m0["pos"] == nil {
		t.Errorf("first message %v", m0)
	}
	if u := wialon(t, srv, "messages/unload", `{}`, sid); len(u) != 0 {
		t.Errorf("unload reply %v, want {}", u)
	}

	if e := wialonErr(wialon(t, srv, "messages/load_interval",
		`{"itemId":99,"timeFrom":0,"timeTo":1,"flags":1,"flagsMask":65281,"loadCount":1}`, sid)); e != 7 {
		t.Errorf("unknown unit: error %d, want 7", e)
	}
	if e := wialonErr(wialon(t, srv, "messages/load_interval", `{"itemId":10001}`, sid)); e != 4 {
		t.Errorf("missing params: error %d, want 4", e)
	}

	// With msgsSource 1 the trips come from the (now empty) loader.
	tripsParams := `{"itemId":10001,"timeFrom":` + itoa(int(from)) + `,"timeTo":` + itoa(int(to)) + `,"msgsSource":1}`
	if e := wialonErr(wialon(t, srv, "unit/get_trips", tripsParams, sid)); e != 4 {
		t.Errorf("get_trips from an empty loader: error %d, want 4", e)
	}
	if r := wialon(t, srv, "messages/load_interval",
		`{"itemId":10001,"timeFrom":`+itoa(int(from))+`,"timeTo":`+itoa(int(to))+`,"flags":1,"flagsMask":65281,"loadCount":0}`, sid); len(r["messages"].([]any)) != 0 {
		t.Errorf("loadCount 0 returned messages: %v", r)
	}

	// get_trips answers a bare array, which wialon() cannot decode as an object.
	form := url.Values{"svc": {"unit/get_trips"}, "sid": {sid},
		"params": {`{"itemId":10001,"timeFrom":` + itoa(int(from)) + `,"timeTo":` + itoa(int(to)) + `,"msgsSource":1}`}}
	resp, err := http.PostForm(srv.URL+"/wialon/ajax.html", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var trips []struct {
		From, To struct {
			T int64
			P struct{ X, Y float64 }
		}
		M float64
	}
	if err := json.NewDecoder(resp.Body).Decode(&trips); err != nil {
		t.Fatal(err)
	}
	// 3 hours hold 40-minute drives every hour: 3 or 4 (partly clipped) trips.
	if len(trips) < 3 || len(trips) > 4 {
		t.Fatalf("got %d trips in 3 h, want 3–4", len(trips))
	}
	for _, tr := range trips {
		if tr.From.T < from || tr.To.T > to || tr.To.T <= tr.From.T || tr.M <= 0 || tr.From.P.Y == 0 {
			t.Errorf("bad trip %+v", tr)
		}
	}
}

func TestFleetUpJWTExpiry(t *testing.T) {
	clk := newClock()
	sim, srv := start(t, Config{Demo: true, Now: clk.Now, JWTLifetime: 10 * time.Second})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)

	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(jwt, ".")[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims struct{ Exp int64 }
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	if want := clk.Now().Add(10 * time.Second).Unix(); claims.Exp != want {
		t.Errorf("exp = %d, want now+10s = %d", claims.Exp, want)
	}

	if r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`); r.status != http.StatusOK {
		t.Fatalf("fresh JWT: HTTP %d", r.status)
	}
	clk.Advance(10 * time.Second)
	if r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`); r.status != http.StatusUnauthorized {
		t.Fatalf("expired JWT: HTTP %d, want 401", r.status)
	}
	st := sim.Stats()
	if st.FleetUpMints != 1 || st.FleetUpMintsByAccount[DemoFleetUpAccountID] != 1 {
		t.Errorf("mints = %d / %v, want 1", st.FleetUpMints, st.FleetUpMintsByAccount)
	}
	if st.FleetUpCallsByAccount[DemoFleetUpAccountID] != 1 {
		t.Errorf("calls by account = %v, want 1 authorised call", st.FleetUpCallsByAccount)
	}
}

func TestFleetUpAuthFailures(t *testing.T) {
	sim, srv := start(t, Config{Demo: true})
	sim.AddFleetUpAccount("other-key", 777, "other-secret")
	good := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	other := mint(t, srv, "other-key", 777, "other-secret")
	parts := strings.Split(good, ".")
	tampered := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"exp":9999999999,"sessionInfo":{"accountId":12345}}`)) + "." + parts[2]

	mintCases := map[string]struct {
		key, body string
	}{
		"unknown key":   {"nope", `{"acctId":12345,"secret":"fleetbroker-demo-secret"}`},
		"no key":        {"", `{"acctId":12345,"secret":"fleetbroker-demo-secret"}`},
		"wrong secret":  {DemoFleetUpAPIKey, `{"acctId":12345,"secret":"x"}`},
		"wrong account": {DemoFleetUpAPIKey, `{"acctId":777,"secret":"fleetbroker-demo-secret"}`},
	}
	for name, c := range mintCases {
		if r := fleetup(t, srv, "/token", c.key, "", c.body); r.status != http.StatusUnauthorized {
			t.Errorf("/token %s: HTTP %d, want 401", name, r.status)
		}
	}
	if r := fleetup(t, srv, "/token", DemoFleetUpAPIKey, "", `not json`); r.status != http.StatusBadRequest {
		t.Errorf("/token bad body: HTTP %d, want 400", r.status)
	}

	callCases := map[string]struct{ key, jwt string }{
		"no bearer":            {DemoFleetUpAPIKey, ""},
		"garbage":              {DemoFleetUpAPIKey, "a.b.c"},
		"tampered":             {DemoFleetUpAPIKey, tampered},
		"other account's JWT":  {DemoFleetUpAPIKey, other},
		"key of other account": {"other-key", good},
		"no key":               {"", good},
	}
	for name, c := range callCases {
		if r := fleetup(t, srv, "/devices", c.key, c.jwt, `{}`); r.status != http.StatusUnauthorized {
			t.Errorf("/devices %s: HTTP %d, want 401", name, r.status)
		}
	}
}

func TestFleetUpEndpoints(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 4})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	call := func(path, body string) fuReply {
		return fleetup(t, srv, path, DemoFleetUpAPIKey, jwt, body)
	}
	now := clk.Now().Unix()

	var devs struct {
		Data []struct{ DevID, DevName string }
	}
	r := call("/devices", `{"acctId":12345}`)
	if err := json.Unmarshal(r.body, &devs); err != nil || len(devs.Data) != 4 || devs.Data[0].DevID == "" {
		t.Fatalf("/devices: %d %s", r.status, r.body)
	}
	dev := devs.Data[1].DevID

	var last struct {
		Data []struct {
			DevID    string
			Lat, Lng float64
			TmGps    string
		}
	}
	r = call("/gpsdata/device-last-location", `{"acctId":12345}`)
	if err := json.Unmarshal(r.body, &last); err != nil || len(last.Data) != 4 || last.Data[0].Lat == 0 || last.Data[0].TmGps == "" {
		t.Fatalf("last location: %d %s", r.status, r.body)
	}

	tests := []struct {
		name, path, body string
		status           int
	}{
		{"gps 1h", "/gpsdata", `{"devId":"` + dev + `","startTime":` + itoa(int(now-3600)) + `,"endTime":` + itoa(int(now)) + `}`, 200},
		{"gps string times", "/gpsdata", `{"devId":"` + dev + `","startTime":"` + itoa(int(now-60)) + `","endTime":"` + itoa(int(now)) + `"}`, 200},
		{"gps over 24h", "/gpsdata", `{"devId":"` + dev + `","startTime":` + itoa(int(now-86401)) + `,"endTime":` + itoa(int(now)) + `}`, 400},
		{"gps future", "/gpsdata", `{"devId":"` + dev + `","startTime":` + itoa(int(now+60)) + `,"endTime":` + itoa(int(now+120)) + `}`, 204},
		{"gps reversed", "/gpsdata", `{"devId":"` + dev + `","startTime":` + itoa(int(now)) + `,"endTime":` + itoa(int(now-10)) + `}`, 400},
		{"gps unknown device", "/gpsdata", `{"devId":"NOPE","startTime":0,"endTime":1}`, 404},
		{"gps no device", "/gpsdata", `{"startTime":0,"endTime":1}`, 400},
		{"trips", "/trips/history", `{"devId":"` + dev + `","startDate":"20250301","endDate":"20250301"}`, 200},
		{"trips 30 days", "/trips/history", `{"devId":"` + dev + `","startDate":"20250130","endDate":"20250228"}`, 200},
		{"trips 31 days", "/trips/history", `{"devId":"` + dev + `","startDate":"20250129","endDate":"20250228"}`, 400},
		{"trips bad date", "/trips/history", `{"devId":"` + dev + `","startDate":"2025-03-01","endDate":"20250301"}`, 400},
		{"unknown path", "/nope", `{}`, 404},
		{"body not object", "/devices", `[1]`, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := call(tt.path, tt.body)
			if r.status != tt.status {
				t.Fatalf("HTTP %d (%s), want %d", r.status, r.body, tt.status)
			}
		})
	}

	r = call("/gpsdata", `{"devId":"`+dev+`","startTime":`+itoa(int(now-3600))+`,"endTime":`+itoa(int(now))+`}`)
	var pts []map[string]any
	if err := json.Unmarshal(r.body, &pts); err != nil || len(pts) != 61 {
		t.Fatalf("/gpsdata reply is not a bare array of 61 points: %v (%d)", err, len(pts))
	}
	r = call("/trips/history", `{"devId":"`+dev+`","startDate":"20250301","endDate":"20250301"}`)
	var trips struct{ Trips []map[string]any }
	if err := json.Unmarshal(r.body, &trips); err != nil || len(trips.Trips) < 11 || len(trips.Trips) > 13 {
		t.Fatalf("/trips/history until noon: %v, %d trips, want ~12", err, len(trips.Trips))
	}
}

func TestFaults(t *testing.T) {
	sim, srv := start(t, Config{Demo: true, Seed: 7})
	sid := login(t, srv, DemoWialonToken)
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	const search = `{"spec":{"itemsType":"avl_unit"},"force":1,"flags":1,"from":0,"to":0}`

	sim.SetFaults(Faults{ErrorRate: 1})
	if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 5 {
		t.Errorf("wialon error fault: error %d, want 5", e)
	}
	if r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`); r.status != http.StatusServiceUnavailable {
		t.Errorf("fleetup error fault: HTTP %d, want 503", r.status)
	}
	// /sim is never faulted, so a test can always turn faults off again.
	resp, err := http.Post(srv.URL+"/sim/faults", "application/json", strings.NewReader(`{"rate_limit_rate":1}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /sim/faults: HTTP %d", resp.StatusCode)
	}
	if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 1003 {
		t.Errorf("wialon rate-limit fault: error %d, want 1003", e)
	}
	r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`)
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") != "1" {
		t.Errorf("fleetup rate-limit fault: HTTP %d Retry-After %q", r.status, r.header.Get("Retry-After"))
	}

	for _, bad := range []string{`{"error_rate":2}`, `{"error_rate":-1}`, `{"slow_delay":"soon"}`, `{"bogus":1}`, `nope`} {
		resp, err := http.Post(srv.URL+"/sim/faults", "application/json", strings.NewReader(bad))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("POST /sim/faults %s: HTTP %d, want 400", bad, resp.StatusCode)
		}
	}

	resp, err = http.Post(srv.URL+"/sim/faults", "application/json", strings.NewReader(`{"slow_rate":1,"slow_delay":"60ms"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	began := time.Now()
	if e := wialonErr(wialon(t, srv, "core/search_items", search, sid)); e != 0 {
		t.Errorf("slow fault should still succeed: error %d", e)
	}
	if d := time.Since(began); d < 60*time.Millisecond {
		t.Errorf("slow fault took %v, want >= 60ms", d)
	}

	st := sim.Stats()
	if st.Faults["error"] != 2 || st.Faults["rate_limit"] != 2 || st.Faults["slow"] != 1 {
		t.Errorf("fault counters = %v, want error 2, rate_limit 2, slow 1", st.Faults)
	}
}

func TestFaultsAreReproducible(t *testing.T) {
	run := func() []int {
		sim, srv := start(t, Config{Demo: true, Seed: 42})
		sid := login(t, srv, DemoWialonToken)
		sim.SetFaults(Faults{ErrorRate: 0.5})
		var codes []int
		for range 20 {
			codes = append(codes, wialonErr(wialon(t, srv, "core/search_items", `{"spec":{"itemsType":"avl_unit"},"flags":1}`, sid)))
		}
		return codes
	}
	a, b := run(), run()
	if !equal(a, b) {
		t.Errorf("same seed, different faults:\n%v\n%v", a, b)
	}
	failed := 0
	for _, c := range a {
		if c == 5 {
			failed++
		}
	}
	if failed == 0 || failed == 20 {
		t.Errorf("error rate 0.5 failed %d of 20", failed)
	}
}

func equal(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestStatsEndpointHidesCredentials(t *testing.T) {
	sim, srv := start(t, Config{Demo: true})
	login(t, srv, DemoWialonToken)
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`)

	resp, err := http.Get(srv.URL + "/sim/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, secret := range []string{DemoWialonToken, DemoFleetUpAPIKey, DemoFleetUpSecret, jwt} {
		if bytes.Contains(body, []byte(secret)) {
			t.Errorf("/sim/stats reveals a credential: %s", body)
		}
	}
	var st Stats
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatal(err)
	}
	if st.WialonLogins != 1 || st.FleetUpMints != 1 || st.Requests["fleetup POST /devices"] != 1 ||
		st.WialonLoginsByToken[Fingerprint(DemoWialonToken)] != 1 {
		t.Errorf("stats = %+v", st)
	}
	if got := sim.Stats(); got.WialonLogins != st.WialonLogins {
		t.Errorf("Stats() and /sim/stats disagree")
	}
}

func TestFleetIsDeterministic(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	a, b := newFleet(10, 3), newFleet(10, 3)
	for i := range a {
		if a[i].at(at) != b[i].at(at) {
			t.Fatalf("unit %d differs between identical fleets", i)
		}
		f := a[i].at(at)
		if f.Lat < -90 || f.Lat > 90 || f.Lon < -180 || f.Lon > 180 || f.Course < 0 || f.Course >= 360 {
			t.Errorf("unit %d: implausible fix %+v", i, f)
		}
	}
	if newFleet(10, 4)[0].at(at) == a[0].at(at) {
		t.Error("different seeds gave the same fleet")
	}
}
