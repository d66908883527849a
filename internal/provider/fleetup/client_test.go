package fleetup_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Canary credentials that must never show up in error text.
const (
	canaryKey    = "CANARYapikeyCANARYapikey"
	canarySecret = "CANARYsecretCANARYsecret"
	canaryAcct   = int64(4242)
)

// fastClient retries 5xx at once and reports every 429 without waiting it
// out (TestRateLimitRetries covers the wait).
func fastClient() *fleetup.Client {
	return fleetup.New(nil, fleetup.WithRetry(3, time.Millisecond, 2*time.Millisecond), fleetup.WithMaxRetryAfter(0))
}

// allowAll is a raw allow-list with the paths these tests call.
func allowAll(t *testing.T, paths ...string) *fleetup.RawPaths {
	t.Helper()
	r, err := fleetup.NewRawPaths(append([]string{"/devices", "/gpsdata", "/alerts/summary", "/x", "/no/such/endpoint"}, paths...))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func startSim(t *testing.T, cfg simulator.Config) (*simulator.Simulator, string) {
	t.Helper()
	cfg.Demo = true
	sim := simulator.New(cfg)
	sim.AddFleetUpAccount(canaryKey, canaryAcct, canarySecret)
	srv := httptest.NewServer(sim.Handler())
	t.Cleanup(srv.Close)
	return sim, srv.URL
}

func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL
}

// login mints a JWT for the canary account.
func login(t *testing.T, c *fleetup.Client, base string) fleetup.Auth {
	t.Helper()
	tok, err := c.MintToken(context.Background(), base, canaryKey, canaryAcct, canarySecret)
	if err != nil {
		t.Fatal(err)
	}
	return fleetup.Auth{BaseURL: base, APIKey: canaryKey, JWT: tok.JWT, AccountID: canaryAcct}
}

func kindOf(t *testing.T, err error) upstream.Kind {
	t.Helper()
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		t.Fatalf("error %v (%T) is not an *upstream.Error", err, err)
	}
	if ue.Provider != "fleetup" {
		t.Errorf("Provider = %q, want fleetup", ue.Provider)
	}
	return ue.Kind
}

func TestHappyPath(t *testing.T) {
	sim, base := startSim(t, simulator.Config{Units: 4})
	c := fastClient()
	ctx := context.Background()

	tok, err := c.MintToken(ctx, base, canaryKey, canaryAcct, canarySecret)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(tok.Expiry); d < 3590*time.Second || d > 3601*time.Second {
		t.Errorf("Expiry in %v, want ~3600 s (read from the JWT)", d)
	}
	cred := fleetup.Auth{BaseURL: base, APIKey: canaryKey, JWT: tok.JWT, AccountID: canaryAcct}

	devs, err := c.Devices(ctx, cred)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 4 || devs[0].ID == "" || devs[0].Name == "" {
		t.Fatalf("devices = %+v", devs)
	}

	all, err := c.LastLocations(ctx, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 4 {
		t.Fatalf("got %d last locations, want 4", len(all))
	}
	for _, l := range all {
		if l.DeviceID == "" || l.Lat == 0 || l.Time.IsZero() || time.Since(l.Time) > time.Minute {
			t.Errorf("incomplete location %+v", l)
		}
	}
	some, err := c.LastLocations(ctx, cred, []string{devs[2].ID})
	if err != nil || len(some) != 1 || some[0].DeviceID != devs[2].ID {
		t.Fatalf("filtered last locations = %+v, %v", some, err)
	}

	to := time.Now().Truncate(time.Minute)
	hist, err := c.GPSHistory(ctx, cred, devs[1].ID, to.Add(-50*time.Hour), to)
	if err != nil {
		t.Fatal(err)
	}
	if len(hist) != 50*60+1 {
		t.Errorf("50 h of history: %d fixes, want %d (one a minute, no duplicates at window edges)", len(hist), 50*60+1)
	}
	for i, l := range hist {
		if l.DeviceID != devs[1].ID {
			t.Fatalf("fix %d belongs to %q", i, l.DeviceID)
		}
		if i > 0 && !l.Time.After(hist[i-1].Time) {
			t.Fatalf("fixes out of order or duplicated at %d", i)
		}
	}
	future, err := c.GPSHistory(ctx, cred, devs[1].ID, time.Now().Add(time.Hour), time.Now().Add(2*time.Hour))
	if err != nil || len(future) != 0 {
		t.Errorf("204 should be an empty result: %v, %d", err, len(future))
	}

	from := to.Add(-45 * 24 * time.Hour)
	trips, err := c.Trips(ctx, cred, devs[0].ID, from, to)
	if err != nil {
		t.Fatal(err)
	}
	// One 40-minute trip an hour: about 45*24 of them.
	if len(trips) < 45*24-2 || len(trips) > 45*24+2 {
		t.Errorf("got %d trips in 45 days, want ~%d", len(trips), 45*24)
	}
	seen := map[time.Time]bool{}
	for _, tr := range trips {
		if tr.DeviceID != devs[0].ID || !tr.To.Time.After(tr.From.Time) || tr.DistanceM <= 0 || tr.From.Lat == 0 {
			t.Fatalf("bad trip %+v", tr)
		}
		if tr.To.Time.Before(from) || tr.From.Time.After(to) {
			t.Fatalf("trip %+v outside [%v, %v]", tr, from, to)
		}
		if seen[tr.From.Time] {
			t.Fatalf("trip at %v returned twice", tr.From.Time)
		}
		seen[tr.From.Time] = true
	}

	st := sim.Stats()
	if st.FleetUpMintsByAccount[canaryAcct] != 1 {
		t.Errorf("mints = %d, want 1", st.FleetUpMintsByAccount[canaryAcct])
	}
	if got := st.Requests["fleetup POST /gpsdata"]; got != 4 {
		t.Errorf("/gpsdata requests = %d, want 3 windows for 50 h + 1 for the future range", got)
	}
	if got := st.Requests["fleetup POST /trips/history"]; got != 2 {
		t.Errorf("/trips/history requests = %d, want 2 windows for 45 days", got)
	}
}

type recorded struct {
	path, apiKey, authz, token string
	body                       map[string]any
}

type recorder struct {
	next http.Handler
	mu   sync.Mutex
	reqs []recorded
}

func (rec *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	var body map[string]any
	_ = json.Unmarshal(b, &body)
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, recorded{r.URL.Path, r.Header.Get("x-api-key"), r.Header.Get("Authorization"), r.Header.Get("token"), body})
	rec.mu.Unlock()
	r.Body = io.NopCloser(strings.NewReader(string(b)))
	rec.next.ServeHTTP(w, r)
}

func (rec *recorder) find(path string) []recorded {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []recorded
	for _, r := range rec.reqs {
		if r.path == path {
			out = append(out, r)
		}
	}
	return out
}

// TestWireFormat holds the requests to upstream-facts.md (FleetUp): the
// JWT both as Authorization: Bearer and as a "token" header, acctId in
// every body, /gpsdata in windows under 24 hours with YYYYMMDDHHMMSS times,
// /trips/history in windows of at most 30 days with YYYYMMDD dates.
func TestWireFormat(t *testing.T) {
	sim := simulator.New(simulator.Config{Units: 2})
	sim.AddFleetUpAccount(canaryKey, canaryAcct, canarySecret)
	rec := &recorder{next: sim.Handler()}
	base := serve(t, rec)
	c := fastClient()
	ctx := context.Background()

	cred := login(t, c, base)
	if _, err := c.Devices(ctx, cred); err != nil {
		t.Fatal(err)
	}
	from := time.Date(2025, 1, 1, 6, 0, 0, 0, time.UTC)
	to := from.Add(30 * time.Hour)
	if _, err := c.GPSHistory(ctx, cred, "SIM000001", from, to); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Trips(ctx, cred, "SIM000002", from, from.AddDate(0, 0, 31)); err != nil {
		t.Fatal(err)
	}

	mint := rec.find("/token")[0]
	if mint.apiKey != canaryKey || mint.authz != "" || mint.token != "" ||
		!reflect.DeepEqual(mint.body, map[string]any{"acctId": float64(canaryAcct), "secret": canarySecret}) {
		t.Errorf("/token request: key %q authz %q body %v", mint.apiKey, mint.authz, mint.body)
	}
	for _, r := range rec.reqs[1:] {
		if r.apiKey != canaryKey || r.authz != "Bearer "+cred.JWT || r.token != cred.JWT || r.body["acctId"] != float64(canaryAcct) {
			t.Errorf("%s: key %q authz %q token %q acctId %v", r.path, r.apiKey, r.authz, r.token, r.body["acctId"])
		}
	}

	gps := rec.find("/gpsdata")
	wantGPS := []map[string]any{
		{"acctId": float64(canaryAcct), "devId": "SIM000001", "startTime": "20250101060000", "endTime": "20250102055959"},
		{"acctId": float64(canaryAcct), "devId": "SIM000001", "startTime": "20250102060000", "endTime": "20250102120000"},
	}
	if len(gps) != 2 || !reflect.DeepEqual(gps[0].body, wantGPS[0]) || !reflect.DeepEqual(gps[1].body, wantGPS[1]) {
		t.Errorf("/gpsdata windows:\n got %v\nwant %v", gps, wantGPS)
	}

	// 31 days from 2025-01-01 06:00, and the day before (a trip that
	// started then may still be under way): 33 calendar days, 2 windows.
	trips := rec.find("/trips/history")
	want := [][2]string{{"20241231", "20250129"}, {"20250130", "20250201"}}
	if len(trips) != len(want) {
		t.Fatalf("got %d /trips/history calls, want %d", len(trips), len(want))
	}
	for i, w := range want {
		if trips[i].body["startDate"] != w[0] || trips[i].body["endDate"] != w[1] || trips[i].body["devId"] != "SIM000002" {
			t.Errorf("trips window %d = %v, want %v", i, trips[i].body, w)
		}
	}
}

// fixed answers every request with the same status, headers and body.
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

func TestErrorMapping(t *testing.T) {
	ctx := context.Background()
	mint := func(c *fleetup.Client, base string) error {
		_, err := c.MintToken(ctx, base, canaryKey, canaryAcct, canarySecret)
		return err
	}
	devices := func(c *fleetup.Client, base string) error {
		_, err := c.Devices(ctx, fleetup.Auth{BaseURL: base, APIKey: canaryKey, JWT: "h.p.s"})
		return err
	}
	httpDate := time.Now().Add(30 * time.Second).UTC().Format(http.TimeFormat)
	tests := []struct {
		name       string
		status     int
		header     map[string]string
		body       string
		call       func(*fleetup.Client, string) error
		want       upstream.Kind
		retryAfter time.Duration
	}{
		{"401 on /token", 401, nil, `{"message":"Unauthorized"}`, mint, upstream.KindRejected, 0},
		{"401 on a call", 401, nil, `{"message":"Unauthorized"}`, devices, upstream.KindSessionInvalid, 0},
		{"403", 403, nil, ``, devices, upstream.KindAccessDenied, 0},
		{"403 on /token", 403, nil, ``, mint, upstream.KindAccessDenied, 0},
		{"404", 404, nil, `{"message":"not found"}`, devices, upstream.KindNotFound, 0},
		{"400", 400, nil, `{"message":"bad body"}`, devices, upstream.KindInvalidInput, 0},
		{"422", 422, nil, `{"message":"bad params"}`, devices, upstream.KindInvalidInput, 0},
		{"429 seconds", 429, map[string]string{"Retry-After": "5"}, ``, devices, upstream.KindRateLimited, 5 * time.Second},
		{"429 default", 429, nil, ``, devices, upstream.KindRateLimited, time.Second},
		{"429 garbage header", 429, map[string]string{"Retry-After": "soon"}, ``, devices, upstream.KindRateLimited, time.Second},
		{"429 on /token", 429, nil, ``, mint, upstream.KindRateLimited, time.Second},
		{"500", 500, nil, ``, devices, upstream.KindUnavailable, 0},
		{"503", 503, nil, `<html>down</html>`, devices, upstream.KindUnavailable, 0},
		{"503 on /token", 503, nil, ``, mint, upstream.KindUnavailable, 0},
		{"405", 405, nil, ``, devices, upstream.KindInternal, 0},
		{"200 not JSON", 200, nil, `<html>`, devices, upstream.KindInternal, 0},
		{"200 no data list", 200, nil, `{"code":0}`, devices, upstream.KindInternal, 0},
		{"200 device without id", 200, nil, `{"data":[{"devName":"x"}]}`, devices, upstream.KindInternal, 0},
		{"200 token missing", 200, nil, `{"tok":"x"}`, mint, upstream.KindInternal, 0},
		{"204 on /token", 204, nil, ``, mint, upstream.KindInternal, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call(fastClient(), serve(t, &fixed{status: tt.status, header: tt.header, body: tt.body}))
			if err == nil {
				t.Fatal("no error")
			}
			if k := kindOf(t, err); k != tt.want {
				t.Errorf("kind = %v, want %v (%v)", k, tt.want, err)
			}
			var ue *upstream.Error
			errors.As(err, &ue)
			if ue.RetryAfter != tt.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", ue.RetryAfter, tt.retryAfter)
			}
			if tt.status >= 300 && ue.Code != tt.status {
				t.Errorf("Code = %d, want the HTTP status %d", ue.Code, tt.status)
			}
		})
	}

	t.Run("429 HTTP date", func(t *testing.T) {
		err := devices(fastClient(), serve(t, &fixed{status: 429, header: map[string]string{"Retry-After": httpDate}}))
		var ue *upstream.Error
		if !errors.As(err, &ue) || ue.RetryAfter < 25*time.Second || ue.RetryAfter > 31*time.Second {
			t.Errorf("RetryAfter from date = %v", err)
		}
	})

	t.Run("204 is an empty result", func(t *testing.T) {
		h := &fixed{status: 204}
		base := serve(t, h)
		cred := fleetup.Auth{BaseURL: base, APIKey: canaryKey, JWT: "h.p.s"}
		devs, err := fastClient().Devices(ctx, cred)
		if err != nil || len(devs) != 0 {
			t.Errorf("Devices on 204: %v, %v", devs, err)
		}
		locs, err := fastClient().LastLocations(ctx, cred, []string{"x"})
		if err != nil || len(locs) != 0 {
			t.Errorf("LastLocations on 204: %v, %v", locs, err)
		}
	})

	t.Run("shapes", func(t *testing.T) {
		for _, body := range []string{
			`[{"devId":"A","devName":"a"}]`,
			`{"data":[{"devId":"A","devName":"a"}]}`,
			`{"data":{"list":[{"deviceId":"A","name":"a"}]}}`,
			`{"code":0,"data":[null,{"devId":"A","devName":"a"}]}`,
			`{"data":[{"devId":"A","devName":"a"}],"trips":"ignored"}`,
		} {
			devs, err := fastClient().Devices(ctx, fleetup.Auth{BaseURL: serve(t, &fixed{status: 200, body: body}), APIKey: "k", JWT: "j"})
			if err != nil || len(devs) != 1 || devs[0] != (fleetup.Device{ID: "A", Name: "a"}) {
				t.Errorf("%s: %+v, %v", body, devs, err)
			}
		}
	})
}

func TestErrorsFromSimulator(t *testing.T) {
	clk := &clock{t: time.Now()}
	sim, base := startSim(t, simulator.Config{Units: 2, Now: clk.Now})
	c := fastClient()
	ctx := context.Background()

	_, err := c.MintToken(ctx, base, canaryKey, canaryAcct, "wrong")
	if k := kindOf(t, err); k != upstream.KindRejected {
		t.Errorf("wrong secret: %v, want rejected", err)
	}
	_, err = c.MintToken(ctx, base, "unknown-key", canaryAcct, canarySecret)
	if k := kindOf(t, err); k != upstream.KindRejected {
		t.Errorf("unknown key: %v, want rejected", err)
	}

	cred := login(t, c, base)
	_, err = c.GPSHistory(ctx, cred, "NOPE", clk.Now().Add(-time.Hour), clk.Now())
	if k := kindOf(t, err); k != upstream.KindNotFound {
		t.Errorf("unknown device: %v, want not_found", err)
	}

	sim.SetFaults(simulator.Faults{RateLimitRate: 1})
	_, err = c.Devices(ctx, cred)
	var ue *upstream.Error
	if k := kindOf(t, err); k != upstream.KindRateLimited || !errors.As(err, &ue) || ue.RetryAfter != time.Second {
		t.Errorf("rate-limit fault: %v, want rate_limited after 1s", err)
	}
	sim.SetFaults(simulator.Faults{ErrorRate: 1})
	_, err = c.Devices(ctx, cred)
	if k := kindOf(t, err); k != upstream.KindUnavailable {
		t.Errorf("error fault: %v, want unavailable", err)
	}
	sim.SetFaults(simulator.Faults{})

	clk.Advance(time.Hour + time.Second)
	_, err = c.Devices(ctx, cred)
	if k := kindOf(t, err); k != upstream.KindSessionInvalid {
		t.Errorf("expired JWT: %v, want session_invalid", err)
	}
	_, err = c.Devices(ctx, fleetup.Auth{BaseURL: base, APIKey: canaryKey})
	if k := kindOf(t, err); k != upstream.KindSessionInvalid {
		t.Errorf("no JWT yet: %v, want session_invalid", err)
	}
	_, err = c.Devices(ctx, fleetup.Auth{BaseURL: base, APIKey: "bad\r\nkey", JWT: "x"})
	if k := kindOf(t, err); k != upstream.KindInvalidInput {
		t.Errorf("header injection: %v, want invalid_input", err)
	}
	for _, tc := range []struct {
		dev      string
		from, to time.Time
	}{
		{"", clk.Now().Add(-time.Hour), clk.Now()},
		{"SIM000001", clk.Now(), clk.Now().Add(-time.Hour)},
		{"SIM000001", time.Time{}, clk.Now()},
	} {
		_, err := c.GPSHistory(ctx, cred, tc.dev, tc.from, tc.to)
		if k := kindOf(t, err); k != upstream.KindInvalidInput {
			t.Errorf("GPSHistory(%q, %v, %v): %v, want invalid_input", tc.dev, tc.from, tc.to, err)
		}
		_, err = c.Trips(ctx, cred, tc.dev, tc.from, tc.to)
		if k := kindOf(t, err); k != upstream.KindInvalidInput {
			t.Errorf("Trips(%q, %v, %v): %v, want invalid_input", tc.dev, tc.from, tc.to, err)
		}
	}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestRetries(t *testing.T) {
	ctx := context.Background()

	t.Run("bounded attempts, reads only", func(t *testing.T) {
		sim, base := startSim(t, simulator.Config{Units: 2})
		c := fastClient()
		cred := login(t, c, base)
		sim.SetFaults(simulator.Faults{ErrorRate: 1})
		before := sim.Stats().Requests

		now := time.Now()
		calls := []struct {
			endpoint string
			want     int64
			do       func() error
		}{
			{"POST /devices", 3, func() error { _, err := c.Devices(ctx, cred); return err }},
			{"POST /gpsdata/device-last-location", 3, func() error { _, err := c.LastLocations(ctx, cred, nil); return err }},
			{"POST /gpsdata", 3, func() error { _, err := c.GPSHistory(ctx, cred, "SIM000001", now.Add(-time.Hour), now); return err }},
			{"POST /trips/history", 3, func() error { _, err := c.Trips(ctx, cred, "SIM000001", now.Add(-time.Hour), now); return err }},
			{"POST /token", 1, func() error {
				_, err := c.MintToken(ctx, base, canaryKey, canaryAcct, canarySecret)
				return err
			}},
			{"POST /alerts/summary", 1, func() error {
				_, _, err := c.Raw(ctx, cred, allowAll(t), http.MethodPost, "/alerts/summary", json.RawMessage(`{}`))
				return err
			}},
		}
		for _, call := range calls {
			if err := call.do(); upstream.KindOf(err) != upstream.KindUnavailable {
				t.Errorf("%s: %v, want unavailable", call.endpoint, err)
			}
		}
		after := sim.Stats().Requests
		for _, call := range calls {
			key := "fleetup " + call.endpoint
			if got := after[key] - before[key]; got != call.want {
				t.Errorf("%s sent %d times, want %d", call.endpoint, got, call.want)
			}
		}
	})

	t.Run("recovers from transient failures", func(t *testing.T) {
		sim := simulator.New(simulator.Config{Units: 2})
		sim.AddFleetUpAccount(canaryKey, canaryAcct, canarySecret)
		var mu sync.Mutex
		failNext := 0
		base := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			fail := failNext > 0
			if fail {
				failNext--
			}
			mu.Unlock()
			if fail {
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			sim.Handler().ServeHTTP(w, r)
		}))
		c := fastClient()
		cred := login(t, c, base)
		mu.Lock()
		failNext = 2
		mu.Unlock()
		devs, err := c.Devices(ctx, cred)
		if err != nil || len(devs) != 2 {
			t.Errorf("Devices after 2 failures: %v, %d", err, len(devs))
		}
	})

	t.Run("no retry on other statuses", func(t *testing.T) {
		for _, status := range []int{403, 404, 422} {
			h := &fixed{status: status}
			_, _ = fastClient().Devices(ctx, fleetup.Auth{BaseURL: serve(t, h), APIKey: "k", JWT: "j"})
			if h.count() != 1 {
				t.Errorf("HTTP %d retried: %d requests", status, h.count())
			}
		}
		// A 401 is not retried either; the second request is the probe
		// that tells a dead JWT from a refused endpoint.
		h := &fixed{status: 401}
		_, _ = fastClient().Devices(ctx, fleetup.Auth{BaseURL: serve(t, h), APIKey: "k", JWT: "j"})
		if h.count() != 2 {
			t.Errorf("HTTP 401: %d requests, want the call and one probe", h.count())
		}
	})
}

func TestContextIsHonoured(t *testing.T) {
	sim, base := startSim(t, simulator.Config{Units: 1})
	cred := login(t, fastClient(), base)

	t.Run("deadline during request", func(t *testing.T) {
		sim.SetFaults(simulator.Faults{SlowRate: 1, SlowDelay: 5 * time.Second})
		defer sim.SetFaults(simulator.Faults{})
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		began := time.Now()
		_, err := fastClient().Devices(ctx, cred)
		if !errors.Is(err, context.DeadlineExceeded) || upstream.KindOf(err) != upstream.KindUnavailable {
			t.Errorf("err = %v, want unavailable wrapping DeadlineExceeded", err)
		}
		if d := time.Since(began); d > 2*time.Second {
			t.Errorf("took %v", d)
		}
	})

	t.Run("cancel between windows", func(t *testing.T) {
		sim.SetFaults(simulator.Faults{ErrorRate: 1})
		defer sim.SetFaults(simulator.Faults{})
		c := fleetup.New(nil, fleetup.WithRetry(3, 10*time.Second, 10*time.Second))
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(50*time.Millisecond, cancel)
		began := time.Now()
		_, err := c.GPSHistory(ctx, cred, "SIM000001", time.Now().Add(-72*time.Hour), time.Now())
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if d := time.Since(began); d > 2*time.Second {
			t.Errorf("took %v", d)
		}
	})
}

func TestRaw(t *testing.T) {
	sim, base := startSim(t, simulator.Config{Units: 3})
	c := fastClient()
	ctx := context.Background()
	cred := login(t, c, base)
	allow := allowAll(t)

	status, reply, err := c.Raw(ctx, cred, allow, http.MethodPost, "/devices", json.RawMessage(`{"acctId":4242}`))
	if err != nil || status != 200 {
		t.Fatalf("Raw /devices: %d %v", status, err)
	}
	var devs struct{ Data []map[string]any }
	if err := json.Unmarshal(reply, &devs); err != nil || len(devs.Data) != 3 {
		t.Errorf("Raw reply %s", reply)
	}

	status, reply, err = c.Raw(ctx, cred, allow, http.MethodPost, "/gpsdata",
		json.RawMessage(fmt.Sprintf(`{"devId":"SIM000001","startTime":%d,"endTime":%d}`, time.Now().Add(time.Hour).Unix(), time.Now().Add(2*time.Hour).Unix())))
	if status != 204 || reply != nil || err != nil {
		t.Errorf("Raw 204: %d %s %v", status, reply, err)
	}

	status, reply, err = c.Raw(ctx, cred, allow, http.MethodPost, "/no/such/endpoint", nil)
	if status != 404 || kindOf(t, err) != upstream.KindNotFound || !json.Valid(reply) || len(reply) == 0 {
		t.Errorf("Raw 404: %d %s %v", status, reply, err)
	}

	// Refused before anything is sent (TestRawPaths has the whole list).
	before := sim.Stats().Requests
	for _, tt := range []struct{ method, path, body string }{
		{"POST", "/token", `{}`},
		{"POST", "/TOKEN/", `{}`},
		{"POST", "/devices/../token", `{}`},
		{"POST", "/alerts/history", `{}`}, // a read, but not on this list
		{"DELETE", "/devices", ``},
		{"POST", "/devices", `{oops`},
	} {
		if _, _, err := c.Raw(ctx, cred, allow, tt.method, tt.path, json.RawMessage(tt.body)); err == nil {
			t.Errorf("Raw(%s %s) was not refused", tt.method, tt.path)
		}
	}
	if _, _, err := c.Raw(ctx, cred, nil, http.MethodPost, "/devices", nil); upstream.KindOf(err) != upstream.KindAccessDenied {
		t.Errorf("Raw with no allow-list: %v, want access denied", err)
	}
	if after := sim.Stats().Requests; !reflect.DeepEqual(before, after) {
		t.Errorf("refused Raw calls reached the server")
	}
}

// echo is a provider that repeats everything it was sent — headers and
// body — in its error message and in its successful replies.
func echo(status int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		msg := fmt.Sprintf("key=%s auth=%s body=%s\n%s", r.Header.Get("x-api-key"), r.Header.Get("Authorization"), b, strings.Repeat("y", 400))
		out, _ := json.Marshal(map[string]any{"message": msg, "data": []any{}})
		w.WriteHeader(status)
		w.Write(out)
	})
}

func TestSecretsNeverInErrors(t *testing.T) {
	const jwt = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.CANARYsignature"
	ctx := context.Background()
	secrets := []string{canaryKey, canarySecret, jwt}

	for _, status := range []int{400, 401, 403, 404, 422, 429, 500, 503} {
		base := serve(t, echo(status))
		cred := fleetup.Auth{BaseURL: base, APIKey: canaryKey, JWT: jwt}
		c := fastClient()
		_, e1 := c.MintToken(ctx, base, canaryKey, canaryAcct, canarySecret)
		_, e2 := c.Devices(ctx, cred)
		_, e3 := c.GPSHistory(ctx, cred, "d", time.Unix(0, 0), time.Unix(60, 0))
		_, raw, e4 := c.Raw(ctx, cred, allowAll(t), http.MethodPost, "/x", json.RawMessage(`{"q":1}`))
		for i, err := range []error{e1, e2, e3, e4} {
			if err == nil {
				t.Fatalf("HTTP %d call %d: no error", status, i)
			}
			text := err.Error()
			for _, s := range secrets {
				if strings.Contains(text, s) {
					t.Errorf("HTTP %d call %d: error text carries a secret: %s", status, i, text)
				}
			}
			if !strings.Contains(text, "[redacted]") {
				t.Errorf("HTTP %d call %d: reason should be kept, scrubbed: %s", status, i, text)
			}
			if len(text) > 400 || strings.ContainsAny(text, "\r\n") {
				t.Errorf("HTTP %d call %d: reason not bounded/cleaned", status, i)
			}
		}
		for _, s := range []string{canaryKey, jwt} {
			if strings.Contains(string(raw), s) {
				t.Errorf("Raw reply carries the broker's credential: %s", raw)
			}
		}
	}

	// Successful Raw replies are scrubbed too.
	_, raw, err := fastClient().Raw(ctx, fleetup.Auth{BaseURL: serve(t, echo(200)), APIKey: canaryKey, JWT: jwt}, allowAll(t), http.MethodPost, "/x", nil)
	if err != nil || !json.Valid(raw) || strings.Contains(string(raw), canaryKey) || strings.Contains(string(raw), jwt) {
		t.Errorf("Raw 200 reply: %s, %v", raw, err)
	}

	// A misconfigured base URL must not leak through url.Error.
	srv := httptest.NewServer(http.NotFoundHandler())
	dead := srv.URL
	srv.Close()
	withSecret := strings.Replace(dead, "http://", "http://u:"+canarySecret+"@", 1)
	_, err = fastClient().MintToken(ctx, withSecret, canaryKey, canaryAcct, canarySecret)
	if upstream.KindOf(err) != upstream.KindUnavailable || strings.Contains(err.Error(), canarySecret) {
		t.Errorf("connection refused: %v", err)
	}

	cred := fleetup.Auth{BaseURL: "b", APIKey: canaryKey, JWT: jwt}
	tok := fleetup.Token{JWT: jwt, Expiry: time.Now()}
	for _, s := range []string{fmt.Sprint(cred), fmt.Sprintf("%+v", cred), fmt.Sprintf("%#v", cred), fmt.Sprint(tok), fmt.Sprintf("%#v", &tok)} {
		for _, sec := range secrets {
			if strings.Contains(s, sec) {
				t.Errorf("formatting reveals a secret: %s", s)
			}
		}
	}
}

func TestRedirectsAreNotFollowed(t *testing.T) {
	target := &fixed{status: 200, body: `{"token":"x.y.z"}`}
	targetURL := serve(t, target)
	base := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, targetURL+"/token", http.StatusPermanentRedirect)
	}))
	_, err := fastClient().MintToken(context.Background(), base, canaryKey, canaryAcct, canarySecret)
	if kindOf(t, err) != upstream.KindInternal || target.count() != 0 {
		t.Errorf("redirect: %v, target hit %d times", err, target.count())
	}
}

func TestMintTokenExpiryFallback(t *testing.T) {
	// Not a JWT, but FleetUp's older replies carried expireTime.
	base := serve(t, &fixed{status: 200, body: `{"token":"opaque","expireTime":1900000000}`})
	tok, err := fastClient().MintToken(context.Background(), base, canaryKey, canaryAcct, canarySecret)
	if err != nil || !tok.Expiry.Equal(time.Unix(1900000000, 0)) {
		t.Errorf("expireTime fallback: %v, %v", tok.Expiry, err)
	}
	base = serve(t, &fixed{status: 200, body: `{"token":"opaque"}`})
	tok, err = fastClient().MintToken(context.Background(), base, canaryKey, canaryAcct, canarySecret)
	if d := time.Until(tok.Expiry); err != nil || d < 3590*time.Second || d > 3600*time.Second {
		t.Errorf("documented-lifetime fallback: expiry in %v, %v", d, err)
	}
}
