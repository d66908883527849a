package telemetry_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/telemetry"
)

// canary stands for everything that must never become a label value: a
// tenant id, a credential id, a handle, a token, a secret.
const canary = "CanaryT3lem7"

// series returns the label sets of every series of the metric family name.
func series(t *testing.T, m *telemetry.Metrics, name string) []map[string]string {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	var out []map[string]string
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, s := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			out = append(out, labels)
		}
	}
	return out
}

// count returns the value of a counter, or the sample count of a histogram,
// of the series of name with exactly labels; 0 if there is none.
func count(t *testing.T, m *telemetry.Metrics, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	next:
		for _, s := range f.GetMetric() {
			if len(s.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range s.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue next
				}
			}
			switch {
			case s.GetCounter() != nil:
				return s.GetCounter().GetValue()
			case s.GetHistogram() != nil:
				return float64(s.GetHistogram().GetSampleCount())
			case s.GetGauge() != nil:
				return s.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// assertNoCanary fails if any label value of any series holds the canary.
func assertNoCanary(t *testing.T, m *telemetry.Metrics) {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, f := range families {
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				if strings.Contains(strings.ToLower(l.GetValue()), strings.ToLower(canary)) {
					t.Errorf("%s has label %s=%q", f.GetName(), l.GetName(), l.GetValue())
				}
			}
		}
	}
}

func TestNewMetricsRegistersEverything(t *testing.T) {
	m := telemetry.NewMetrics()
	// Touch one series of each vector so it is gathered.
	m.ObserveUpstreamError("wialon", "rate_limited")
	m.ObserveTokenLookup("wialon-eid", true)
	m.ObserveTokenMint("fleetup-jwt", time.Second, nil)
	m.ObserveVault("decrypt", time.Millisecond, nil)
	m.SetReadiness("redis", true)
	client := &http.Client{Transport: telemetry.InstrumentTransport(roundTripFunc(okResponse), telemetry.ProviderFleetUp, m)}
	resp, err := client.Get("http://fleetup.invalid/devices")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	for _, name := range []string{
		"fleetbroker_upstream_request_duration_seconds",
		"fleetbroker_gateway_upstream_errors_total",
		"fleetbroker_token_cache_lookups_total",
		"fleetbroker_token_cache_mints_total",
		"fleetbroker_token_cache_mint_duration_seconds",
		"fleetbroker_vault_request_duration_seconds",
		"fleetbroker_readiness_check_passing",
		"go_goroutines",
		"process_start_time_seconds",
	} {
		if len(series(t, m, name)) == 0 {
			t.Errorf("no series of %s", name)
		}
	}
	// The metric names, types and help are valid for Prometheus.
	if problems, err := testutil.GatherAndLint(m.Registry()); err != nil {
		t.Fatalf("lint: %v", err)
	} else {
		for _, p := range problems {
			if strings.HasPrefix(p.Metric, "fleetbroker_") {
				t.Errorf("lint %s: %s", p.Metric, p.Text)
			}
		}
	}
}

func TestObserveBoundsLabels(t *testing.T) {
	m := telemetry.NewMetrics()
	m.ObserveUpstreamError("wialon", "session_invalid")
	m.ObserveUpstreamError(canary, canary)
	m.ObserveTokenLookup("wialon-eid", true)
	m.ObserveTokenLookup("fleetup-jwt", false)
	m.ObserveTokenLookup(canary, false)
	m.ObserveTokenMint("wialon-eid", 20*time.Millisecond, nil)
	m.ObserveTokenMint("fleetup-jwt", 20*time.Millisecond, errors.New("rejected "+canary))
	m.ObserveVault("token lookup", time.Millisecond, nil)
	m.ObserveVault("datakey", time.Millisecond, errors.New(canary))
	m.ObserveVault("transit/decrypt/"+canary, time.Millisecond, nil)

	tests := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"fleetbroker_gateway_upstream_errors_total", map[string]string{"provider": "wialon", "kind": "session_invalid"}, 1},
		{"fleetbroker_gateway_upstream_errors_total", map[string]string{"provider": "other", "kind": "other"}, 1},
		{"fleetbroker_token_cache_lookups_total", map[string]string{"provider": "wialon", "kind": "wialon-eid", "result": "hit"}, 1},
		{"fleetbroker_token_cache_lookups_total", map[string]string{"provider": "fleetup", "kind": "fleetup-jwt", "result": "miss"}, 1},
		{"fleetbroker_token_cache_lookups_total", map[string]string{"provider": "other", "kind": "other", "result": "miss"}, 1},
		{"fleetbroker_token_cache_mints_total", map[string]string{"provider": "wialon", "kind": "wialon-eid", "result": "ok"}, 1},
		{"fleetbroker_token_cache_mints_total", map[string]string{"provider": "fleetup", "kind": "fleetup-jwt", "result": "error"}, 1},
		{"fleetbroker_token_cache_mint_duration_seconds", map[string]string{"provider": "fleetup", "kind": "fleetup-jwt"}, 1},
		{"fleetbroker_vault_request_duration_seconds", map[string]string{"operation": "token_lookup", "result": "ok"}, 1},
		{"fleetbroker_vault_request_duration_seconds", map[string]string{"operation": "datakey", "result": "error"}, 1},
		{"fleetbroker_vault_request_duration_seconds", map[string]string{"operation": "other", "result": "ok"}, 1},
	}
	for _, tt := range tests {
		if got := count(t, m, tt.name, tt.labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	assertNoCanary(t, m)
}

// TestNilMetrics: code paths may call every recorder without checking
// whether metrics are on.
func TestNilMetrics(t *testing.T) {
	var m *telemetry.Metrics
	m.ObserveUpstreamError("wialon", "internal")
	m.ObserveTokenLookup("wialon-eid", true)
	m.ObserveTokenMint("wialon-eid", time.Second, nil)
	m.ObserveVault("decrypt", time.Second, nil)
	m.SetReadiness("redis", false)
	rt := roundTripFunc(okResponse)
	if got := telemetry.InstrumentTransport(rt, telemetry.ProviderWialon, m); got == nil {
		t.Fatal("InstrumentTransport(nil metrics) = nil")
	}
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	rdb.AddHook(m.RedisHook())
	if err := rdb.Set(context.Background(), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET through a nil-metrics hook: %v", err)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func okResponse(r *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader("{}")), Request: r}, nil
}

// wialonServer answers Wialon-style form posts and checks that the
// transport left the body intact.
func wialonServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil {
			t.Errorf("upstream could not parse the form: %v", err)
		}
		if r.Form.Get("sid") != canary {
			t.Errorf("upstream got sid %q: the instrumented transport changed the request", r.Form.Get("sid"))
		}
		switch r.FormValue("svc") {
		case "unit/get_trips":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "messages/unload":
			w.WriteHeader(http.StatusTeapot)
		}
		_, _ = io.WriteString(w, `{}`)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestInstrumentTransportWialon(t *testing.T) {
	srv := wialonServer(t)
	m := telemetry.NewMetrics()
	client := &http.Client{Transport: telemetry.InstrumentTransport(http.DefaultTransport, telemetry.ProviderWialon, m)}
	// params sorts before svc in an encoded form, and is made longer than
	// any buffer the transport scans with, so svc is found past it.
	longParams := `{"spec":{"itemsType":"avl_unit","propValueMask":"` + strings.Repeat(canary, 100) + `"}}`
	post := func(svc string) {
		t.Helper()
		form := url.Values{"svc": {svc}, "params": {longParams}, "sid": {canary}}
		resp, err := client.PostForm(srv.URL+"/wialon/ajax.html", form)
		if err != nil {
			t.Fatalf("POST %s: %v", svc, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	post("core/search_items")
	post("core/search_items")
	post("token/login")
	post("unit/get_trips")
	post("messages/unload")
	post("core/" + strings.ToLower(canary)) // a CallProvider svc nobody listed
	post("")

	// The GET form of the API carries svc in the query.
	resp, err := client.Get(srv.URL + "/wialon/ajax.html?svc=messages/load_interval&sid=" + canary)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	const name = "fleetbroker_upstream_request_duration_seconds"
	for _, tt := range []struct {
		endpoint, status string
		want             float64
	}{
		{"core/search_items", "200", 2},
		{"token/login", "200", 1},
		{"unit/get_trips", "503", 1},
		{"messages/unload", "4xx", 1}, // 418 is not a status the providers use
		{"messages/load_interval", "200", 1},
		{"other", "200", 2},
	} {
		labels := map[string]string{"provider": "wialon", "endpoint": tt.endpoint, "status": tt.status}
		if got := count(t, m, name, labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", name, labels, got, tt.want)
		}
	}
	assertNoCanary(t, m)
}

func TestInstrumentTransportFleetUp(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/token":
			w.WriteHeader(http.StatusUnauthorized)
		case "/slow/devices":
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		_, _ = io.WriteString(w, `{"data":[]}`)
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	m := telemetry.NewMetrics()
	client := &http.Client{Transport: telemetry.InstrumentTransport(http.DefaultTransport, telemetry.ProviderFleetUp, m)}
	do := func(ctx context.Context, path string) error {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+path, strings.NewReader(`{"acctId":1,"secret":"`+canary+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	for _, p := range []string{"/token", "/devices", "/devices/", "/gpsdata/device-last-location", "/gpsdata", "/trips/history",
		"/api/v2/devices", // a base URL with a path prefix
		"/devices/" + canary, "/" + canary} {
		if err := do(context.Background(), p); err != nil {
			t.Fatalf("POST %s: %v", p, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := do(ctx, "/slow/devices"); err == nil {
		t.Fatal("slow request did not time out")
	}
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	req, _ := http.NewRequest(http.MethodPost, closed.URL+"/gpsdata", nil)
	if resp, err := client.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("request to a closed server succeeded")
	}

	const name = "fleetbroker_upstream_request_duration_seconds"
	for _, tt := range []struct {
		endpoint, status string
		want             float64
	}{
		{"/token", "401", 1},
		{"/devices", "200", 3},
		{"/gpsdata/device-last-location", "200", 1},
		{"/gpsdata", "200", 1},
		{"/trips/history", "200", 1},
		{"other", "200", 2},
		{"/devices", "timeout", 1},
		{"/gpsdata", "error", 1},
	} {
		labels := map[string]string{"provider": "fleetup", "endpoint": tt.endpoint, "status": tt.status}
		if got := count(t, m, name, labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", name, labels, got, tt.want)
		}
	}
	assertNoCanary(t, m)
}

// TestInstrumentTransportTimesTheBody: the duration runs until the body is
// closed, so a slow download is not reported as fast.
func TestInstrumentTransportTimesTheBody(t *testing.T) {
	m := telemetry.NewMetrics()
	client := &http.Client{Transport: telemetry.InstrumentTransport(roundTripFunc(okResponse), telemetry.ProviderFleetUp, m)}
	resp, err := client.Post("http://fleetup.invalid/devices", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"provider": "fleetup", "endpoint": "/devices", "status": "200"}
	const name = "fleetbroker_upstream_request_duration_seconds"
	if got := count(t, m, name, labels); got != 0 {
		t.Errorf("observed %v times before the body was closed, want 0", got)
	}
	resp.Body.Close()
	resp.Body.Close()
	if got := count(t, m, name, labels); got != 1 {
		t.Errorf("observed %v times after closing the body twice, want 1", got)
	}
}

func TestRedisHook(t *testing.T) {
	mr := miniredis.RunT(t)
	m := telemetry.NewMetrics()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	rdb.AddHook(m.RedisHook())
	ctx := context.Background()
	key := "fb:{" + canary + "}:tok:" + canary
	if err := rdb.Set(ctx, key, canary, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Get(ctx, key).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Get(ctx, key+":missing").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET missing = %v, want redis.Nil", err)
	}
	if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Incr(ctx, key+":n")
		p.Expire(ctx, key+":n", time.Minute)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Do(ctx, strings.ToLower(canary), key).Err(); err == nil {
		t.Fatal("unknown command succeeded")
	}
	mr.SetError("LOADING Redis is loading the dataset in memory") // Redis failing
	if err := rdb.Get(ctx, key).Err(); err == nil {
		t.Fatal("GET on a failing Redis succeeded")
	}

	const name = "fleetbroker_redis_command_duration_seconds"
	for _, tt := range []struct {
		command, result string
		want            float64
	}{
		{"set", "ok", 1},
		{"get", "ok", 1},
		{"get", "nil", 1},
		{"get", "error", 1},
		{"pipeline", "ok", 1},
		{"other", "error", 1},
	} {
		labels := map[string]string{"command": tt.command, "result": tt.result}
		if got := count(t, m, name, labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", name, labels, got, tt.want)
		}
	}
	assertNoCanary(t, m)
}

func TestHandlerAndServe(t *testing.T) {
	m := telemetry.NewMetrics()
	m.ObserveTokenLookup("wialon-eid", true)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- telemetry.ServeListener(ctx, lis, m.Handler(), nil) }()

	resp, err := http.Get("http://" + lis.Addr().String() + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics = %d", resp.StatusCode)
	}
	for _, want := range []string{
		`fleetbroker_token_cache_lookups_total{kind="wialon-eid",provider="wialon",result="hit"} 1`,
		"go_goroutines ",
		"promhttp_metric_handler_requests_total",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeListener after cancel = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeListener did not return after cancel")
	}
	if _, err := http.Get("http://" + lis.Addr().String() + "/metrics"); err == nil {
		t.Error("metrics still served after shutdown")
	}
}

func TestServeListenError(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	err = telemetry.Serve(context.Background(), lis.Addr().String(), http.NotFoundHandler(), nil)
	if err == nil {
		t.Fatal("Serve on a taken address returned nil")
	}
}

func newMiniRedisClient(t *testing.T) *redis.Client {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}
