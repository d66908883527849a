package wialon_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// canary is a token-shaped secret that must never show up in error text.
const canary = "CANARYtok3nCANARYtok3nCANARYtok3nCANARYtok3nCANARYtok3nCANARYtok3nCANARY"

func fastClient() *wialon.Client {
	return wialon.New(nil, wialon.WithRetry(3, time.Millisecond, 2*time.Millisecond), wialon.WithLimitRetry(4, time.Millisecond, 2*time.Millisecond))
}

func startSim(t *testing.T, cfg simulator.Config) (*simulator.Simulator, *httptest.Server) {
	t.Helper()
	cfg.Demo = true
	sim := simulator.New(cfg)
	srv := httptest.NewServer(sim.Handler())
	t.Cleanup(srv.Close)
	return sim, srv
}

func kindOf(t *testing.T, err error) upstream.Kind {
	t.Helper()
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		t.Fatalf("error %v (%T) is not an *upstream.Error", err, err)
	}
	if ue.Provider != "wialon" {
		t.Errorf("Provider = %q, want wialon", ue.Provider)
	}
	return ue.Kind
}

func TestHappyPath(t *testing.T) {
	sim, srv := startSim(t, simulator.Config{Units: 5})
	c := fastClient()
	ctx := context.Background()

	sess, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}
	if sess.SID == "" || sess.User == "" {
		t.Fatalf("session = %+v", sess)
	}

	units, err := c.SearchUnits(ctx, srv.URL, sess.SID)
	if err != nil {
		t.Fatal(err)
	}
	if len(units) != 5 {
		t.Fatalf("got %d units, want 5", len(units))
	}
	for _, u := range units {
		if u.ID == 0 || u.Name == "" || u.Pos == nil || u.Pos.Time.IsZero() || u.Pos.Lat == 0 || u.Pos.Satellites == 0 {
			t.Errorf("incomplete unit %+v pos %+v", u, u.Pos)
		}
	}

	to := time.Now()
	from := to.Add(-time.Hour)
	msgs, err := c.LoadMessages(ctx, srv.URL, sess.SID, units[0].ID, from, to, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 10 {
		t.Fatalf("got %d messages, want 10", len(msgs))
	}
	for i, m := range msgs {
		if m.Pos == nil || m.Type != "ud" || m.Time.Before(from.Truncate(time.Second)) || len(m.Params) == 0 {
			t.Errorf("message %d = %+v", i, m)
		}
		if i > 0 && !m.Time.After(msgs[i-1].Time) {
			t.Errorf("messages out of order at %d", i)
		}
		if !m.Pos.Time.Equal(m.Time) {
			t.Errorf("message %d: pos time %v != message time %v", i, m.Pos.Time, m.Time)
		}
	}
	all, err := c.LoadMessages(ctx, srv.URL, sess.SID, units[0].ID, from, to, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) < 60 || len(all) > 61 {
		t.Errorf("loadCount 0 returned %d messages, want all 60–61", len(all))
	}

	trips, err := c.Trips(ctx, srv.URL, sess.SID, units[1].ID, to.Add(-3*time.Hour), to)
	if err != nil {
		t.Fatal(err)
	}
	if len(trips) < 2 || len(trips) > 4 {
		t.Fatalf("got %d trips in 3 h, want 2–4", len(trips))
	}
	for _, tr := range trips {
		if !tr.To.Time.After(tr.From.Time) || tr.DistanceMeters <= 0 || tr.From.Lat == 0 {
			t.Errorf("bad trip %+v", tr)
		}
	}

	st := sim.Stats()
	if got, want := st.Requests["wialon messages/unload"], st.Requests["wialon messages/load_interval"]; got != want || got != 3 {
		t.Errorf("unloads = %d, loads = %d, want 3 each", got, want)
	}

	if err := c.Logout(ctx, srv.URL, sess.SID); err != nil {
		t.Fatal(err)
	}
	_, err = c.SearchUnits(ctx, srv.URL, sess.SID)
	if k := kindOf(t, err); k != upstream.KindSessionInvalid {
		t.Errorf("after logout: %v, want session_invalid", err)
	}
	if err := c.Logout(ctx, srv.URL, sess.SID); err != nil {
		t.Errorf("second logout = %v, want nil (already logged out)", err)
	}
}

// recorder wraps a handler and keeps every Wialon form it passes on.
type recorder struct {
	next http.Handler
	mu   sync.Mutex
	reqs []recorded
}

type recorded struct {
	method, rawQuery, svc, sid string
	params                     map[string]any
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err == nil {
		var p map[string]any
		_ = json.Unmarshal([]byte(r.PostForm.Get("params")), &p)
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, recorded{r.Method, r.URL.RawQuery, r.PostForm.Get("svc"), r.PostForm.Get("sid"), p})
		rec.mu.Unlock()
	}
	rec.next.ServeHTTP(w, r)
}

func (rec *recorder) find(svc string) []recorded {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []recorded
	for _, r := range rec.reqs {
		if r.svc == svc {
			out = append(out, r)
		}
	}
	return out
}

func TestWireFormat(t *testing.T) {
	sim := simulator.New(simulator.Config{Demo: true, Units: 2})
	rec := &recorder{next: sim.Handler()}
	srv := httptest.NewServer(rec)
	defer srv.Close()
	c := fastClient()
	ctx := context.Background()

	sess, err := c.Login(ctx, srv.URL+"/", simulator.DemoWialonToken) // trailing slash tolerated
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.SearchUnits(ctx, srv.URL, sess.SID); err != nil {
		t.Fatal(err)
	}
	from, to := time.Unix(1_700_000_000, 0), time.Unix(1_700_003_600, 0)
	if _, err := c.LoadMessages(ctx, srv.URL, sess.SID, 10001, from, to, 5); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Trips(ctx, srv.URL, sess.SID, 10002, from, to); err != nil {
		t.Fatal(err)
	}

	for _, r := range rec.reqs {
		if r.method != http.MethodPost || r.rawQuery != "" {
			t.Errorf("%s sent as %s with query %q; want POST with everything in the body", r.svc, r.method, r.rawQuery)
		}
	}
	login := rec.find("token/login")[0]
	if login.params["token"] != simulator.DemoWialonToken || login.sid != "" {
		t.Errorf("login params %v sid %q", login.params, login.sid)
	}

	search := rec.find("core/search_items")[0]
	want := map[string]any{
		"spec":  map[string]any{"itemsType": "avl_unit", "propName": "sys_name", "propValueMask": "*", "sortType": "sys_name"},
		"force": 1.0, "flags": float64(0x1 | 0x400), "from": 0.0, "to": 0.0,
	}
	if !reflect.DeepEqual(search.params, want) || search.sid != sess.SID {
		t.Errorf("search params = %v, want %v", search.params, want)
	}

	loads := rec.find("messages/load_interval")
	if len(loads) != 2 {
		t.Fatalf("got %d load_interval calls, want 2", len(loads))
	}
	wantLoad := map[string]any{"itemId": 10001.0, "timeFrom": 1_700_000_000.0, "timeTo": 1_700_003_600.0, "flags": 1.0, "flagsMask": 65281.0, "loadCount": 5.0}
	if !reflect.DeepEqual(loads[0].params, wantLoad) {
		t.Errorf("load_interval params = %v, want %v", loads[0].params, wantLoad)
	}
	if loads[1].params["loadCount"] != 0.0 || loads[1].params["itemId"] != 10002.0 {
		t.Errorf("Trips should fill the loader without returning messages: %v", loads[1].params)
	}
	trips := rec.find("unit/get_trips")[0]
	wantTrips := map[string]any{"itemId": 10002.0, "timeFrom": 1_700_000_000.0, "timeTo": 1_700_003_600.0, "msgsSource": 1.0}
	if !reflect.DeepEqual(trips.params, wantTrips) {
		t.Errorf("get_trips params = %v, want %v", trips.params, wantTrips)
	}
	if n := len(rec.find("messages/unload")); n != 2 {
		t.Errorf("got %d unloads, want 2", n)
	}
}

// fixed answers every request with the same status and body, counting them.
type fixed struct {
	status int
	header map[string]string
	body   string
	mu     sync.Mutex
	n      int
}

func (f *fixed) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	f.mu.Lock()
	f.n++
	f.mu.Unlock()
	for k, v := range f.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(f.status)
	fmt.Fprint(w, f.body)
}

func (f *fixed) count() int { f.mu.Lock(); defer f.mu.Unlock(); return f.n }

// sequence answers bodies in turn (HTTP 200), the last one from then on.
type sequence struct {
	bodies []string
	mu     sync.Mutex
	n      int
}

func (s *sequence) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	body := s.bodies[min(s.n, len(s.bodies)-1)]
	s.n++
	s.mu.Unlock()
	fmt.Fprint(w, body)
}

func (s *sequence) count() int { s.mu.Lock(); defer s.mu.Unlock(); return s.n }

func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestErrorMapping(t *testing.T) {
	type call func(c *wialon.Client, base string) error
	search := func(c *wialon.Client, base string) error {
		_, err := c.SearchUnits(context.Background(), base, "sid")
		return err
	}
	login := func(c *wialon.Client, base string) error {
		_, err := c.Login(context.Background(), base, canary)
		return err
	}
	tests := []struct {
		name       string
		status     int
		header     map[string]string
		body       string
		call       call
		want       upstream.Kind
		wantCode   int
		retryAfter time.Duration
		// reason, if set, must be in the error's text.
		reason string
	}{
		{"invalid session", 200, nil, `{"error":1}`, search, upstream.KindSessionInvalid, 1, 0, ""},
		{"session expired or IP changed", 200, nil, `{"error":1011}`, search, upstream.KindSessionInvalid, 1011, 0, "egress IP changed"},
		{"invalid input", 200, nil, `{"error":4}`, search, upstream.KindInvalidInput, 4, 0, ""},
		{"request failed", 200, nil, `{"error":5}`, search, upstream.KindUnavailable, 5, 2 * time.Second, ""},
		{"unknown error", 200, nil, `{"error":6}`, search, upstream.KindUnavailable, 6, 2 * time.Second, ""},
		{"access denied", 200, nil, `{"error":7}`, search, upstream.KindAccessDenied, 7, 0, ""},
		{"bad credentials at login", 200, nil, `{"error":8,"reason":"invalid token"}`, login, upstream.KindRejected, 8, 0, ""},
		{"8 outside login", 200, nil, `{"error":8}`, search, upstream.KindInternal, 8, 0, ""},
		{"auth server unavailable", 200, nil, `{"error":9}`, login, upstream.KindUnavailable, 9, 5 * time.Second, "authorization server"},
		{"too many messages", 200, nil, `{"error":1004}`, search, upstream.KindInvalidInput, 1004, 0, "narrow the interval"},
		{"unknown service", 200, nil, `{"error":2}`, search, upstream.KindInvalidInput, 2, 0, "does not know this service"},
		{"invalid result", 200, nil, `{"error":3}`, search, upstream.KindInternal, 3, 0, ""},
		{"password reset", 200, nil, `{"error":11}`, search, upstream.KindInternal, 11, 0, ""},
		{"billing", 200, nil, `{"error":14}`, search, upstream.KindAccessDenied, 14, 0, "billing"},
		{"item exists", 200, nil, `{"error":1002}`, search, upstream.KindInvalidInput, 1002, 0, "already exists"},
		{"two-factor attempts", 200, nil, `{"error":1006}`, login, upstream.KindRateLimited, 1006, 100 * time.Second, ""},
		{"execution time", 200, nil, `{"error":1005}`, search, upstream.KindInvalidInput, 1005, 0, "narrow the interval"},
		{"too many requests", 200, nil, `{"error":10}`, search, upstream.KindRateLimited, 10, time.Second, ""},
		{"concurrency limit", 200, nil, `{"error":1003,"reason":"LIMIT api_concurrent"}`, search, upstream.KindRateLimited, 1003, time.Second, ""},
		{"other number", 200, nil, `{"error":77}`, search, upstream.KindInternal, 77, 0, ""},
		{"error as string", 200, nil, `{"error":"boom"}`, search, upstream.KindInternal, 0, 0, ""},
		{"not JSON", 200, nil, `<html>oops</html>`, search, upstream.KindInternal, 0, 0, ""},
		{"wrong field type", 200, nil, `{"items":[{"id":"x"}]}`, search, upstream.KindInternal, 0, 0, ""},
		{"missing items", 200, nil, `{}`, search, upstream.KindInternal, 0, 0, ""},
		{"login without eid", 200, nil, `{"au":"x"}`, login, upstream.KindInternal, 0, 0, ""},
		{"HTTP 500", 500, nil, ``, search, upstream.KindUnavailable, 0, 0, ""},
		{"HTTP 502", 502, nil, `bad gateway`, login, upstream.KindUnavailable, 0, 0, ""},
		{"HTTP 503", 503, nil, ``, search, upstream.KindUnavailable, 0, 0, ""},
		{"HTTP 429", 429, map[string]string{"Retry-After": "7"}, ``, search, upstream.KindRateLimited, 0, 7 * time.Second, ""},
		{"HTTP 429 no header", 429, nil, ``, search, upstream.KindRateLimited, 0, time.Second, ""},
		{"HTTP 404", 404, nil, ``, search, upstream.KindInternal, 0, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := serve(t, &fixed{status: tt.status, header: tt.header, body: tt.body})
			err := tt.call(fastClient(), base)
			if err == nil {
				t.Fatal("no error")
			}
			if k := kindOf(t, err); k != tt.want {
				t.Errorf("kind = %v, want %v (%v)", k, tt.want, err)
			}
			var ue *upstream.Error
			errors.As(err, &ue)
			if ue.Code != tt.wantCode {
				t.Errorf("Code = %d, want %d", ue.Code, tt.wantCode)
			}
			if ue.RetryAfter != tt.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", ue.RetryAfter, tt.retryAfter)
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("error %q does not say %q", err, tt.reason)
			}
			if strings.Contains(err.Error(), canary) {
				t.Errorf("error text carries the token: %v", err)
			}
		})
	}
}

func TestErrorsFromSimulator(t *testing.T) {
	sim, srv := startSim(t, simulator.Config{})
	c := fastClient()
	ctx := context.Background()

	_, err := c.Login(ctx, srv.URL, canary)
	if k := kindOf(t, err); k != upstream.KindRejected {
		t.Errorf("unknown token: %v, want rejected", err)
	}
	sess, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}
	sim.ExpireWialonSessions()
	_, err = c.SearchUnits(ctx, srv.URL, sess.SID)
	if k := kindOf(t, err); k != upstream.KindSessionInvalid {
		t.Errorf("expired session: %v, want session_invalid", err)
	}

	sess, _ = c.Login(ctx, srv.URL, simulator.DemoWialonToken)
	sim.SetFaults(simulator.Faults{RateLimitRate: 1})
	_, err = c.SearchUnits(ctx, srv.URL, sess.SID)
	if k := kindOf(t, err); k != upstream.KindRateLimited {
		t.Errorf("rate-limit fault: %v, want rate_limited", err)
	}
	sim.SetFaults(simulator.Faults{ErrorRate: 1})
	_, err = c.LoadMessages(ctx, srv.URL, sess.SID, 10001, time.Now().Add(-time.Hour), time.Now(), 1)
	if k := kindOf(t, err); k != upstream.KindUnavailable {
		t.Errorf("error fault: %v, want unavailable", err)
	}
	sim.SetFaults(simulator.Faults{})
	_, err = c.LoadMessages(ctx, srv.URL, sess.SID, 424242, time.Now().Add(-time.Hour), time.Now(), 1)
	if k := kindOf(t, err); k != upstream.KindAccessDenied {
		t.Errorf("unknown unit: %v, want access_denied", err)
	}
	_, err = c.LoadMessages(ctx, srv.URL, sess.SID, 10001, time.Now(), time.Now().Add(-time.Hour), 1)
	if k := kindOf(t, err); k != upstream.KindInvalidInput {
		t.Errorf("reversed interval: %v, want invalid_input", err)
	}
}

func TestNetworkErrorIsUnavailable(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	base := srv.URL
	srv.Close() // nothing listens there any more

	// A misconfigured base URL with user info must not leak through url.Error.
	withSecret := strings.Replace(base, "http://", "http://user:"+canary+"@", 1)
	_, err := wialon.New(nil).Login(context.Background(), withSecret, canary)
	if k := kindOf(t, err); k != upstream.KindUnavailable {
		t.Errorf("connection refused: %v, want unavailable", err)
	}
	if strings.Contains(err.Error(), canary) {
		t.Errorf("error text carries a secret: %v", err)
	}
	_, err = wialon.New(nil).Login(context.Background(), "http://["+canary, canary)
	if err == nil || strings.Contains(err.Error(), canary) {
		t.Errorf("invalid base URL: %v", err)
	}
}

func TestRedirectsAreNotFollowed(t *testing.T) {
	target := &fixed{status: 200, body: `{"eid":"stolen"}`}
	targetURL := serve(t, target)
	base := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, targetURL+"/wialon/ajax.html", http.StatusTemporaryRedirect)
	}))
	_, err := fastClient().Login(context.Background(), base, canary)
	if k := kindOf(t, err); k != upstream.KindInternal {
		t.Errorf("redirect: %v, want internal", err)
	}
	if target.count() != 0 {
		t.Error("the client followed a redirect and re-sent the token")
	}
}

// flaky fails the first n requests with HTTP 503, then passes to next.
type flaky struct {
	next http.Handler
	mu   sync.Mutex
	n    int
	seen map[string]int
}

func (f *flaky) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	f.mu.Lock()
	if f.seen == nil {
		f.seen = map[string]int{}
	}
	f.seen[r.PostForm.Get("svc")]++
	fail := f.n > 0
	if fail {
		f.n--
	}
	f.mu.Unlock()
	if fail {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	f.next.ServeHTTP(w, r)
}

func TestRetries(t *testing.T) {
	ctx := context.Background()
	from, to := time.Now().Add(-time.Hour), time.Now()

	t.Run("reads recover from transient failures", func(t *testing.T) {
		sim := simulator.New(simulator.Config{Demo: true, Units: 2})
		f := &flaky{next: sim.Handler()}
		base := serve(t, f)
		c := fastClient()
		sess, err := c.Login(ctx, base, simulator.DemoWialonToken)
		if err != nil {
			t.Fatal(err)
		}
		f.mu.Lock()
		f.n = 2
		f.mu.Unlock()
		units, err := c.SearchUnits(ctx, base, sess.SID)
		if err != nil || len(units) != 2 {
			t.Fatalf("SearchUnits after 2 failures: %v, %d units", err, len(units))
		}
		f.mu.Lock()
		f.n = 2
		f.mu.Unlock()
		if _, err := c.Trips(ctx, base, sess.SID, 10001, from, to); err != nil {
			t.Fatalf("Trips after 2 failures: %v", err)
		}
	})

	t.Run("bounded attempts, reads only", func(t *testing.T) {
		sim, srv := startSim(t, simulator.Config{Units: 2})
		c := fastClient()
		sess, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken)
		if err != nil {
			t.Fatal(err)
		}
		sim.SetFaults(simulator.Faults{ErrorRate: 1})
		before := sim.Stats().Requests

		calls := []struct {
			svc  string
			want int64
			do   func() error
		}{
			{"core/search_items", 3, func() error { _, err := c.SearchUnits(ctx, srv.URL, sess.SID); return err }},
			{"messages/load_interval", 3, func() error {
				_, err := c.LoadMessages(ctx, srv.URL, sess.SID, 10001, from, to, 1)
				return err
			}},
			{"token/login", 1, func() error { _, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken); return err }},
			{"core/logout", 1, func() error { return c.Logout(ctx, srv.URL, sess.SID) }},
			{"core/search_item", 1, func() error {
				_, err := c.Raw(ctx, srv.URL, sess.SID, "core/search_item", json.RawMessage(`{"id":10001,"flags":1}`))
				return err
			}},
		}
		for _, call := range calls {
			if err := call.do(); upstream.KindOf(err) != upstream.KindUnavailable {
				t.Errorf("%s: %v, want unavailable", call.svc, err)
			}
		}
		after := sim.Stats().Requests
		for _, call := range calls {
			if got := after["wialon "+call.svc] - before["wialon "+call.svc]; got != call.want {
				t.Errorf("%s sent %d times, want %d", call.svc, got, call.want)
			}
		}
		if after["wialon messages/unload"] != before["wialon messages/unload"] {
			t.Error("unload sent although nothing was loaded")
		}
	})

	t.Run("concurrency refusals are retried, raw calls too, a bounded number of times", func(t *testing.T) {
		for _, body := range []string{`{"error":1003}`, `{"error":10}`} {
			h := &fixed{status: 200, body: body}
			base := serve(t, h)
			if _, err := fastClient().SearchUnits(ctx, base, "sid"); upstream.KindOf(err) != upstream.KindRateLimited {
				t.Errorf("%s: %v, want rate_limited", body, err)
			}
			if _, err := fastClient().Raw(ctx, base, "sid", "core/search_item", nil); upstream.KindOf(err) != upstream.KindRateLimited {
				t.Errorf("raw %s: %v, want rate_limited", body, err)
			}
			if h.count() != 8 {
				t.Errorf("%s: %d requests, want 4 tries of each call", body, h.count())
			}
		}
		h := &fixed{status: 200, body: `{"error":1003}`}
		_, _ = fastClient().Login(ctx, serve(t, h), canary)
		if h.count() != 1 {
			t.Errorf("a login refused 1003 was tried %d times: a login is never retried", h.count())
		}
	})

	t.Run("at most 4 tries in all, at most 3 of them failed runs", func(t *testing.T) {
		tests := []struct {
			name   string
			bodies []string // answered in turn, the last one from then on
			want   int
			kind   upstream.Kind
		}{
			{"failures only", []string{`{"error":5}`}, 3, upstream.KindUnavailable},
			{"refusals only", []string{`{"error":1003}`}, 4, upstream.KindRateLimited},
			{"refusal, failure, refusal, failure", []string{`{"error":1003}`, `{"error":5}`, `{"error":1003}`, `{"error":5}`, `{"error":1003}`}, 4, upstream.KindUnavailable},
			{"three refusals, then failures", []string{`{"error":1003}`, `{"error":1003}`, `{"error":1003}`, `{"error":5}`}, 4, upstream.KindUnavailable},
			{"a refusal, then failures", []string{`{"error":1003}`, `{"error":5}`}, 4, upstream.KindUnavailable},
			{"two failures, then refusals", []string{`{"error":5}`, `{"error":5}`, `{"error":1003}`}, 4, upstream.KindRateLimited},
		}
		for _, tt := range tests {
			h := &sequence{bodies: tt.bodies}
			_, err := fastClient().SearchUnits(ctx, serve(t, h), "sid")
			if upstream.KindOf(err) != tt.kind || h.count() != tt.want {
				t.Errorf("%s: %d requests ending in %v, want %d ending %s", tt.name, h.count(), err, tt.want, tt.kind)
			}
		}
	})

	t.Run("a retry that does not fit the deadline is not made, and says so", func(t *testing.T) {
		for _, body := range []string{`{"error":1003}`, `{"error":5}`} {
			h := &fixed{status: 200, body: body}
			c := wialon.New(nil, wialon.WithRetry(3, 10*time.Second, 10*time.Second), wialon.WithLimitRetry(4, 10*time.Second, 10*time.Second))
			dctx, cancel := context.WithTimeout(ctx, time.Second)
			_, err := c.SearchUnits(dctx, serve(t, h), "sid")
			cancel()
			if h.count() != 1 || !errors.Is(err, upstream.ErrOutOfTime) || upstream.KindOf(err) == upstream.KindInternal {
				t.Errorf("%s: %d requests, %v; want 1, marked out of time, the upstream's kind kept", body, h.count(), err)
			}
		}
	})

	t.Run("no retry on other kinds", func(t *testing.T) {
		for _, body := range []string{`{"error":1}`, `{"error":4}`} {
			h := &fixed{status: 200, body: body}
			_, _ = fastClient().SearchUnits(ctx, serve(t, h), "sid")
			if h.count() != 1 {
				t.Errorf("%s retried: %d requests", body, h.count())
			}
		}
	})
}

func TestNoMessagesIsEmpty(t *testing.T) {
	h := &fixed{status: 200, body: `{"error":1001}`}
	base := serve(t, h)
	msgs, err := fastClient().LoadMessages(context.Background(), base, "sid", 1, time.Unix(0, 0), time.Unix(60, 0), 10)
	if err != nil || len(msgs) != 0 {
		t.Errorf("error 1001: %v, %d messages; want empty and nil", err, len(msgs))
	}
	trips, err := fastClient().Trips(context.Background(), base, "sid", 1, time.Unix(0, 0), time.Unix(60, 0))
	if err != nil || len(trips) != 0 {
		t.Errorf("Trips on error 1001: %v, %d trips", err, len(trips))
	}
	if h.count() != 2 {
		t.Errorf("%d requests; want one load each and no unload", h.count())
	}
}

func TestContextIsHonoured(t *testing.T) {
	sim, srv := startSim(t, simulator.Config{Units: 1})
	sess, err := fastClient().Login(context.Background(), srv.URL, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("deadline during request", func(t *testing.T) {
		sim.SetFaults(simulator.Faults{SlowRate: 1, SlowDelay: 5 * time.Second})
		defer sim.SetFaults(simulator.Faults{})
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		began := time.Now()
		_, err := fastClient().SearchUnits(ctx, srv.URL, sess.SID)
		if !errors.Is(err, context.DeadlineExceeded) || upstream.KindOf(err) != upstream.KindUnavailable {
			t.Errorf("err = %v, want unavailable wrapping DeadlineExceeded", err)
		}
		if d := time.Since(began); d > 2*time.Second {
			t.Errorf("took %v: the deadline was not honoured", d)
		}
	})

	t.Run("cancel during retry pause", func(t *testing.T) {
		sim.SetFaults(simulator.Faults{ErrorRate: 1})
		defer sim.SetFaults(simulator.Faults{})
		c := wialon.New(nil, wialon.WithRetry(3, 10*time.Second, 10*time.Second))
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(50*time.Millisecond, cancel)
		began := time.Now()
		_, err := c.SearchUnits(ctx, srv.URL, sess.SID)
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if d := time.Since(began); d > 2*time.Second {
			t.Errorf("took %v: cancellation was not honoured", d)
		}
	})

	t.Run("client timeout without ctx deadline", func(t *testing.T) {
		sim.SetFaults(simulator.Faults{SlowRate: 1, SlowDelay: 5 * time.Second})
		defer sim.SetFaults(simulator.Faults{})
		c := wialon.New(&http.Client{Timeout: 50 * time.Millisecond}, wialon.WithRetry(1, 0, 0))
		_, err := c.SearchUnits(context.Background(), srv.URL, sess.SID)
		if upstream.KindOf(err) != upstream.KindUnavailable {
			t.Errorf("err = %v, want unavailable", err)
		}
	})
}

func TestRaw(t *testing.T) {
	sim, srv := startSim(t, simulator.Config{Units: 3})
	c := fastClient()
	ctx := context.Background()
	sess, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}

	reply, err := c.Raw(ctx, srv.URL, sess.SID, "core/search_items",
		json.RawMessage(`{"spec":{"itemsType":"avl_unit"},"force":1,"flags":1,"from":0,"to":0}`))
	if err != nil {
		t.Fatal(err)
	}
	var got struct{ TotalItemsCount int }
	if err := json.Unmarshal(reply, &got); err != nil || got.TotalItemsCount != 3 {
		t.Errorf("raw reply %s", reply)
	}

	before := sim.Stats().Requests
	for _, tt := range []struct {
		svc, params string
		want        upstream.Kind
	}{
		{"token/login", `{}`, upstream.KindAccessDenied},
		{"token/update", `{}`, upstream.KindAccessDenied},
		{"core/logout", `{}`, upstream.KindAccessDenied},
		{"core/create_auth_hash", `{}`, upstream.KindAccessDenied},
		{"core/duplicate", `{}`, upstream.KindAccessDenied},
		{"../../admin", `{}`, upstream.KindInvalidInput},
		{"", `{}`, upstream.KindInvalidInput},
		{"core/search_items", `{not json`, upstream.KindInvalidInput},
	} {
		_, err := c.Raw(ctx, srv.URL, sess.SID, tt.svc, json.RawMessage(tt.params))
		if k := kindOf(t, err); k != tt.want {
			t.Errorf("Raw(%q): %v, want %v", tt.svc, err, tt.want)
		}
	}
	if after := sim.Stats().Requests; !reflect.DeepEqual(before, after) {
		t.Errorf("refused Raw calls reached the server: %v -> %v", before, after)
	}

	sim.ExpireWialonSessions()
	_, err = c.Raw(ctx, srv.URL, sess.SID, "core/search_items", nil)
	if k := kindOf(t, err); k != upstream.KindSessionInvalid {
		t.Errorf("Raw on expired session: %v, want session_invalid", err)
	}
}

func TestSecretsNeverInErrors(t *testing.T) {
	const sid = "CANARYsidCANARYsid0123456789abcdef"
	// A provider that quotes what it was sent back in its reason.
	echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		fmt.Fprintf(w, `{"error":8,"reason":"bad token %s for sid %s\n%s"}`,
			jsonEscape(r.PostForm.Get("params")), r.PostForm.Get("sid"), strings.Repeat("x", 500))
	})
	base := serve(t, echo)
	c := fastClient()
	ctx := context.Background()

	var errs []error
	_, err := c.Login(ctx, base, canary)
	errs = append(errs, err)
	_, err = c.SearchUnits(ctx, base, sid)
	errs = append(errs, err)
	_, err = c.LoadMessages(ctx, base, sid, 1, time.Unix(0, 0), time.Unix(1, 0), 1)
	errs = append(errs, err)
	_, err = c.Raw(ctx, base, sid, "core/search_item", nil)
	errs = append(errs, err)
	errs = append(errs, c.Logout(ctx, base, sid))

	for i, err := range errs {
		if err == nil {
			t.Fatalf("call %d: no error", i)
		}
		text := err.Error()
		if strings.Contains(text, canary) || strings.Contains(text, sid) {
			t.Errorf("call %d: error text carries a secret: %s", i, text)
		}
		if !strings.Contains(text, "[redacted]") {
			t.Errorf("call %d: expected the reason to be kept, scrubbed: %s", i, text)
		}
		if len(text) > 400 || strings.ContainsAny(text, "\n\r") {
			t.Errorf("call %d: reason not bounded/cleaned (%d bytes)", i, len(text))
		}
	}

	sess := wialon.Session{SID: sid, User: "u"}
	for _, s := range []string{fmt.Sprint(sess), fmt.Sprintf("%+v", sess), fmt.Sprintf("%#v", sess), fmt.Sprintf("%v", &sess)} {
		if strings.Contains(s, sid) {
			t.Errorf("formatted Session reveals the sid: %s", s)
		}
	}
}

func jsonEscape(s string) string {
	b, _ := json.Marshal(s)
	return string(b[1 : len(b)-1])
}

// The message loader is per-session state: concurrent LoadMessages and Trips
// on one sid must not interleave their load/unload sequences.
func TestLoaderUseIsSerialisedPerSession(t *testing.T) {
	sim := simulator.New(simulator.Config{Demo: true, Units: 3})
	var mu sync.Mutex
	loaded := map[string]bool{}
	overlaps := 0
	guard := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		sid := r.PostForm.Get("sid")
		mu.Lock()
		switch r.PostForm.Get("svc") {
		case "messages/load_interval":
			if loaded[sid] {
				overlaps++
			}
			loaded[sid] = true
		case "messages/unload":
			loaded[sid] = false
		}
		mu.Unlock()
		sim.Handler().ServeHTTP(w, r)
	})
	base := serve(t, guard)
	c := fastClient()
	ctx := context.Background()
	sess, err := c.Login(ctx, base, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}
	to := time.Now()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if i%2 == 0 {
				_, err = c.LoadMessages(ctx, base, sess.SID, 10001, to.Add(-time.Hour), to, 5)
			} else {
				_, err = c.Trips(ctx, base, sess.SID, 10002, to.Add(-2*time.Hour), to)
			}
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if overlaps != 0 {
		t.Errorf("%d loads started while the session's loader was in use", overlaps)
	}
}
