package fleetup_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// countingBudget records what the client asks of its budget.
type countingBudget struct {
	mu    sync.Mutex
	takes int
	holds []time.Duration
}

func (b *countingBudget) Take(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.takes++
	return nil
}

func (b *countingBudget) Hold(_ context.Context, d time.Duration) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.holds = append(b.holds, d)
	return nil
}

func (b *countingBudget) counts() (int, []time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.takes, append([]time.Duration(nil), b.holds...)
}

// Every HTTP request takes one slot of the budget: a 72-hour history is
// three requests and three slots, a 60-day trips query three (30-day
// windows, the day before included), and every retry its own slot.
func TestOneBudgetSlotPerRequest(t *testing.T) {
	sim, base := startSim(t, simulator.Config{Units: 2})
	c := fastClient()
	ctx := context.Background()
	now := time.Now()
	tests := []struct {
		name     string
		endpoint string
		faults   simulator.Faults
		call     func(fleetup.Auth) error
	}{
		{"devices", "POST /devices", simulator.Faults{}, func(a fleetup.Auth) error { _, err := c.Devices(ctx, a); return err }},
		{"72 hours of history", "POST /gpsdata", simulator.Faults{}, func(a fleetup.Auth) error {
			_, err := c.GPSHistory(ctx, a, "SIM000001", now.Add(-72*time.Hour), now)
			return err
		}},
		{"60 days of trips", "POST /trips/history", simulator.Faults{}, func(a fleetup.Auth) error {
			_, err := c.Trips(ctx, a, "SIM000001", now.AddDate(0, 0, -60), now)
			return err
		}},
		{"retries of a failing read", "POST /devices", simulator.Faults{ErrorRate: 1}, func(a fleetup.Auth) error {
			if _, err := c.Devices(ctx, a); upstream.KindOf(err) != upstream.KindUnavailable {
				return fmt.Errorf("want unavailable, got %v", err)
			}
			return nil
		}},
		{"raw", "POST /devices", simulator.Faults{}, func(a fleetup.Auth) error {
			_, _, err := c.Raw(ctx, a, allowAll(t), http.MethodPost, "/devices", nil)
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &countingBudget{}
			cred := login(t, c, base)
			cred.Budget = b
			sim.SetFaults(tt.faults)
			defer sim.SetFaults(simulator.Faults{})
			before := sim.Stats().Requests["fleetup "+tt.endpoint]
			if err := tt.call(cred); err != nil {
				t.Fatal(err)
			}
			sent := sim.Stats().Requests["fleetup "+tt.endpoint] - before
			if takes, _ := b.counts(); int64(takes) != sent || sent < 1 {
				t.Errorf("%d requests sent, %d budget slots taken; want one slot per request", sent, takes)
			}
		})
	}
}

// brokenBudget hands out slots but cannot record a hold (Redis down).
type brokenBudget struct{}

func (brokenBudget) Take(context.Context) error { return nil }
func (brokenBudget) Hold(context.Context, time.Duration) error {
	return errors.New("redis unavailable")
}

// rateLimited answers 429 with Retry-After to the first n requests, then
// passes them on; it records when each request came.
type rateLimited struct {
	next       http.Handler
	retryAfter string
	mu         sync.Mutex
	n          int
	times      []time.Time
}

func (h *rateLimited) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.mu.Lock()
	h.times = append(h.times, time.Now())
	limit := h.n > 0
	if limit {
		h.n--
	}
	h.mu.Unlock()
	if limit {
		w.Header().Set("Retry-After", h.retryAfter)
		w.WriteHeader(http.StatusTooManyRequests)
		return
	}
	h.next.ServeHTTP(w, r)
}

func (h *rateLimited) seen() []time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]time.Time(nil), h.times...)
}

// A 429 on a read is tried again after its Retry-After, which is also held
// on the shared budget; a Retry-After longer than the client waits is
// reported at once (and still held), so the caller can say how long.
func TestRateLimitRetries(t *testing.T) {
	sim := simulator.New(simulator.Config{Units: 2})
	sim.AddFleetUpAccount(canaryKey, canaryAcct, canarySecret)
	ctx := context.Background()

	t.Run("waits out Retry-After", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "1", n: 1}
		base := serve(t, h)
		c := fleetup.New(nil, fleetup.WithRetry(3, time.Millisecond, 2*time.Millisecond))
		cred := fleetup.Auth{BaseURL: base, APIKey: canaryKey, AccountID: canaryAcct}
		tok, err := c.MintToken(ctx, serve(t, sim.Handler()), canaryKey, canaryAcct, canarySecret)
		if err != nil {
			t.Fatal(err)
		}
		cred.JWT = tok.JWT
		devs, err := c.Devices(ctx, cred)
		if err != nil || len(devs) != 2 {
			t.Fatalf("Devices after a 429: %v, %v", devs, err)
		}
		times := h.seen()
		if len(times) != 2 {
			t.Fatalf("%d requests, want the 429 and one more", len(times))
		}
		if gap := times[1].Sub(times[0]); gap < time.Second {
			t.Errorf("tried again %v after a 429 with Retry-After: 1", gap)
		}
	})

	t.Run("holds the budget instead of sleeping", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "1", n: 1}
		c := fleetup.New(nil, fleetup.WithRetry(3, time.Millisecond, 2*time.Millisecond))
		tok, err := c.MintToken(ctx, serve(t, sim.Handler()), canaryKey, canaryAcct, canarySecret)
		if err != nil {
			t.Fatal(err)
		}
		b := &countingBudget{}
		cred := fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, AccountID: canaryAcct, JWT: tok.JWT, Budget: b}
		if _, err := c.Devices(ctx, cred); err != nil {
			t.Fatal(err)
		}
		if takes, holds := b.counts(); takes != 2 || len(holds) != 1 || holds[0] != time.Second {
			t.Errorf("budget saw %d takes and holds %v; want 2 takes and a 1s hold", takes, holds)
		}
	})

	t.Run("waits itself when the budget cannot hold", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "1", n: 1}
		c := fleetup.New(nil, fleetup.WithRetry(3, time.Millisecond, 2*time.Millisecond))
		tok, err := c.MintToken(ctx, serve(t, sim.Handler()), canaryKey, canaryAcct, canarySecret)
		if err != nil {
			t.Fatal(err)
		}
		cred := fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, AccountID: canaryAcct, JWT: tok.JWT, Budget: brokenBudget{}}
		if _, err := c.Devices(ctx, cred); err != nil {
			t.Fatal(err)
		}
		if times := h.seen(); len(times) != 2 || times[1].Sub(times[0]) < time.Second {
			t.Errorf("requests at %v: want a second one at least 1s after the 429", times)
		}
	})

	t.Run("too long to wait", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "30", n: 1}
		c := fleetup.New(nil)
		b := &countingBudget{}
		cred := fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, JWT: "h.p.s", Budget: b}
		start := time.Now()
		_, err := c.Devices(ctx, cred)
		var ue *upstream.Error
		if !errors.As(err, &ue) || ue.Kind != upstream.KindRateLimited || ue.RetryAfter != 30*time.Second {
			t.Fatalf("err = %v, want rate limited, retry after 30s", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("took %v to report a 30s Retry-After", d)
		}
		if _, holds := b.counts(); len(holds) != 1 || holds[0] != 30*time.Second || len(h.seen()) != 1 {
			t.Errorf("holds %v, %d requests; want one 30s hold and no second request", holds, len(h.seen()))
		}
	})

	t.Run("not past the caller's deadline", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "3", n: 1}
		c := fleetup.New(nil)
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := c.Devices(ctx, fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, JWT: "h.p.s"})
		if upstream.KindOf(err) != upstream.KindRateLimited || len(h.seen()) != 1 {
			t.Errorf("err = %v after %d requests, want rate limited after one", err, len(h.seen()))
		}
	})

	t.Run("bounded", func(t *testing.T) {
		h := &rateLimited{next: sim.Handler(), retryAfter: "1", n: 100}
		c := fleetup.New(nil, fleetup.WithRetry(2, time.Millisecond, 2*time.Millisecond))
		_, err := c.Devices(ctx, fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, JWT: "h.p.s", Budget: &countingBudget{}})
		if upstream.KindOf(err) != upstream.KindRateLimited || len(h.seen()) != 2 {
			t.Errorf("err = %v after %d requests, want rate limited after 2", err, len(h.seen()))
		}
	})
}

// jwtMinted is a JWT FleetUp minted at iat, valid an hour.
func jwtMinted(iat time.Time) string {
	payload := fmt.Sprintf(`{"sessionInfo":{"accountId":4242},"iat":%d,"exp":%d}`, iat.Unix(), iat.Add(time.Hour).Unix())
	return "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + base64.RawURLEncoding.EncodeToString([]byte(payload)) + ".c2ln"
}

// byPath answers each path with a status, and a Date of FleetUp's clock.
type byPath struct {
	status map[string]int
	date   time.Time
	mu     sync.Mutex
	paths  []string
}

func (h *byPath) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.mu.Lock()
	h.paths = append(h.paths, r.URL.Path)
	h.mu.Unlock()
	if h.date.IsZero() {
		w.Header()["Date"] = nil // net/http adds none then
	} else {
		w.Header().Set("Date", h.date.UTC().Format(http.TimeFormat))
	}
	code := h.status[r.URL.Path]
	if code == 0 {
		code = 200
	}
	w.WriteHeader(code)
	if code == 200 {
		fmt.Fprint(w, `{"data":[],"trips":[]}`)
	}
}

// A 401 on a data call is a lost session (mint again) only when the JWT is
// dead; a JWT FleetUp minted moments ago, or one that still works on a
// documented JWT endpoint, was refused this endpoint: KindAccessDenied, so
// the gateway never mints in a loop.
func TestUnauthorizedIsALostSessionOnlyForADeadJWT(t *testing.T) {
	ctx := context.Background()
	fleetupNow := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name   string
		iat    time.Time
		date   time.Time // FleetUp's Date header; zero: none
		status map[string]int
		call   string
		want   upstream.Kind
		paths  []string
	}{
		{"fresh JWT refused an endpoint", fleetupNow.Add(-5 * time.Second), fleetupNow,
			map[string]int{"/trips/history": 401}, "trips", upstream.KindAccessDenied, []string{"/trips/history"}},
		{"fresh by the local clock when FleetUp sends no Date", time.Now().Add(-5 * time.Second), time.Time{},
			map[string]int{"/trips/history": 401}, "trips", upstream.KindAccessDenied, []string{"/trips/history"}},
		{"older JWT that works elsewhere", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/trips/history": 401}, "trips", upstream.KindAccessDenied, []string{"/trips/history", "/devices"}},
		{"older JWT refused everywhere", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/trips/history": 401, "/devices": 401}, "trips", upstream.KindSessionInvalid, []string{"/trips/history", "/devices"}},
		{"expired JWT: no probe", fleetupNow.Add(-61 * time.Minute), fleetupNow,
			map[string]int{"/trips/history": 401}, "trips", upstream.KindSessionInvalid, []string{"/trips/history"}},
		{"/devices itself, probed on the last locations", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/devices": 401}, "devices", upstream.KindAccessDenied, []string{"/devices", "/gpsdata/device-last-location"}},
		{"/devices with a dead JWT", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/devices": 401, "/gpsdata/device-last-location": 401}, "devices", upstream.KindSessionInvalid, []string{"/devices", "/gpsdata/device-last-location"}},
		{"probe unavailable", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/trips/history": 401, "/devices": 503}, "trips", upstream.KindUnavailable, []string{"/trips/history", "/devices"}},
		{"403 is refused as it is", fleetupNow.Add(-10 * time.Minute), fleetupNow,
			map[string]int{"/trips/history": 403}, "trips", upstream.KindAccessDenied, []string{"/trips/history"}},
		{"raw call", fleetupNow.Add(-5 * time.Second), fleetupNow,
			map[string]int{"/alerts/summary": 401}, "raw", upstream.KindAccessDenied, []string{"/alerts/summary"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &byPath{status: tt.status, date: tt.date}
			b := &countingBudget{}
			cred := fleetup.Auth{BaseURL: serve(t, h), APIKey: canaryKey, JWT: jwtMinted(tt.iat), AccountID: canaryAcct, Budget: b}
			c := fastClient()
			var err error
			switch tt.call {
			case "trips":
				_, err = c.Trips(ctx, cred, "D1", fleetupNow.Add(-time.Hour), fleetupNow)
			case "devices":
				_, err = c.Devices(ctx, cred)
			case "raw":
				_, _, err = c.Raw(ctx, cred, allowAll(t), http.MethodPost, "/alerts/summary", json.RawMessage(`{}`))
			}
			if upstream.KindOf(err) != tt.want {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if got := strings.Join(h.paths, " "); got != strings.Join(tt.paths, " ") {
				t.Errorf("requests %q, want %q", got, strings.Join(tt.paths, " "))
			}
			if takes, _ := b.counts(); takes != len(h.paths) {
				t.Errorf("%d requests took %d budget slots", len(h.paths), takes)
			}
			if err != nil && strings.Contains(err.Error(), cred.JWT) {
				t.Errorf("error quotes the JWT: %v", err)
			}
		})
	}
}

// /gpsdata's time encoding is unverified: when FleetUp refuses the first
// window's input, the client asks again in the other plausible encoding
// and keeps the one that worked for the base URL.
func TestGPSHistoryFallsBackToUnixSeconds(t *testing.T) {
	sim := simulator.New(simulator.Config{Units: 1})
	sim.AddFleetUpAccount(canaryKey, canaryAcct, canarySecret)
	var mu sync.Mutex
	var bodies []map[string]any
	base := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/gpsdata" {
			var body map[string]any
			_ = json.NewDecoder(r.Body).Decode(&body)
			mu.Lock()
			bodies = append(bodies, body)
			mu.Unlock()
			if _, isString := body["startTime"].(string); isString {
				w.WriteHeader(http.StatusBadRequest) // this "FleetUp" takes only Unix seconds
				return
			}
			w.WriteHeader(http.StatusNoContent)
			return
		}
		sim.Handler().ServeHTTP(w, r)
	}))
	c := fastClient()
	cred := login(t, c, base)
	now := time.Now()
	for range 2 {
		if _, err := c.GPSHistory(context.Background(), cred, "SIM000001", now.Add(-30*time.Hour), now); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var kinds []string
	for _, b := range bodies {
		kinds = append(kinds, fmt.Sprintf("%T", b["startTime"]))
	}
	// First call: window 1 as a string (refused), again as a number, then
	// window 2 as a number; second call: both windows as numbers.
	want := "string float64 float64 float64 float64"
	if got := strings.Join(kinds, " "); got != want {
		t.Errorf("startTime types %q, want %q", got, want)
	}
}

// The raw allow-list: exact paths of letters, digits, '-' and '_' only, so
// no spelling of /token or of a path outside the list gets through; methods
// GET and POST only.
func TestRawPaths(t *testing.T) {
	allow, err := fleetup.NewRawPaths(nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		method, path string
		want         string // "" allowed, "field" INVALID_ARGUMENT, "denied" PERMISSION_DENIED
	}{
		{"POST", "/devices", ""},
		{"POST", "/trips/history", ""},
		{"GET", "/gpsdata/device-last-location", ""},
		{"POST", "/token", "denied"},
		{"GET", "/token", "denied"},
		{"POST", "/Token", "denied"},
		{"POST", "/TOKEN", "denied"},
		{"POST", "/token.", "field"},
		{"POST", "/token.json", "field"},
		{"POST", "/token/", "field"},
		{"POST", "/token;x", "field"},
		{"POST", "/token%00", "field"},
		{"POST", "/devices/../token", "field"},
		{"POST", "/devices/./x", "field"},
		{"POST", "/%2e%2e/token", "field"},
		{"POST", "/%74oken", "field"},
		{"POST", "//token", "field"},
		{"POST", "//evil.test/devices", "field"},
		{"POST", "http://evil.test/devices", "field"},
		{"POST", "devices", "field"},
		{"POST", "/devices?x=/token", "field"},
		{"POST", "/devices?page=2&size=50", ""},
		{"POST", "/token?acctId=1", "denied"},
		{"POST", "/devices?a=%2e%2e", ""}, // a query cannot change the path
		{"POST", "/devices?a#b", "field"},
		{"POST", "/devices#x", "field"},
		{"POST", "/devices\\..\\token", "field"},
		{"POST", "/devices/unlock", "denied"},
		{"POST", "/tripshare/share", "denied"},
		{"POST", "/users", "denied"},
		{"POST", "/devices/SIM000001", "denied"},
		{"PUT", "/devices", "denied"},
		{"DELETE", "/devices", "denied"},
		{"PATCH", "/devices", "denied"},
		{"TRACE", "/devices", "denied"},
		{"post", "/devices", "denied"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			err := allow.Check(tt.method, tt.path)
			var field *provider.FieldError
			switch tt.want {
			case "":
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
			case "field":
				if !errors.As(err, &field) || field.Field != "fleetup.path" {
					t.Fatalf("err = %v, want a fleetup.path field error", err)
				}
			case "denied":
				if upstream.KindOf(err) != upstream.KindAccessDenied {
					t.Fatalf("err = %v, want access denied", err)
				}
			}
		})
	}

	t.Run("operator lists", func(t *testing.T) {
		for _, bad := range [][]string{{"/token"}, {"/TOKEN"}, {"/devices", "/token"}, {"/devices/*"}, {"/a/../token"}, {"devices"}, {" ", ""}} {
			if _, err := fleetup.NewRawPaths(bad); err == nil {
				t.Errorf("NewRawPaths(%q) accepted", bad)
			}
		}
		mine, err := fleetup.NewRawPaths([]string{" /alerts/summary ", "/devices"})
		if err != nil {
			t.Fatal(err)
		}
		if got := mine.Paths(); strings.Join(got, ",") != "/alerts/summary,/devices" {
			t.Errorf("Paths() = %v", got)
		}
		if err := mine.Check("POST", "/trips/history"); upstream.KindOf(err) != upstream.KindAccessDenied {
			t.Errorf("a path the operator left out: %v", err)
		}
	})
}
