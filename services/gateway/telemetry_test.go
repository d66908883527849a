package gateway_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// metricsCanary is the tenant and credential of the sessions below, and
// the Wialon token: none of them may become a label value.
const metricsCanary = "MetricsCanary7f3"

// fakeSessions resolves every handle to one Wialon credential at baseURL
// and mints its sessions as the credentials service would.
type fakeSessions struct {
	credentialsv1.SessionServiceClient // nil: other methods are not called
	baseURL                            string
	mints                              atomic.Int32
}

func (f *fakeSessions) ResolveSession(context.Context, *credentialsv1.ResolveSessionRequest, ...grpc.CallOption) (*credentialsv1.ResolveSessionResponse, error) {
	return &credentialsv1.ResolveSessionResponse{
		SessionId: "ses_" + metricsCanary, TenantId: "tenant-" + metricsCanary, CredentialId: "cred-" + metricsCanary,
		CredentialVersion: 1, Provider: credentialsv1.Provider_PROVIDER_WIALON,
		Scopes:     []credentialsv1.Scope{credentialsv1.Scope_SCOPE_READ},
		ExpireTime: timestamppb.New(time.Now().Add(time.Hour)), BaseUrl: f.baseURL,
		CredentialGeneration: "gen-" + metricsCanary,
	}, nil
}

func (f *fakeSessions) MintUpstreamSession(_ context.Context, req *credentialsv1.MintUpstreamSessionRequest, _ ...grpc.CallOption) (*credentialsv1.MintUpstreamSessionResponse, error) {
	f.mints.Add(1)
	session, err := anypb.New(&credentialsv1.WialonUpstreamSession{Eid: "eid-" + metricsCanary, User: "demo"})
	if err != nil {
		return nil, err
	}
	return &credentialsv1.MintUpstreamSessionResponse{SessionId: "ses_" + metricsCanary, CredentialVersion: 1,
		CredentialGeneration: req.GetCredentialGeneration(), BaseUrl: f.baseURL, UpstreamSession: session}, nil
}

// TestGatewayMetrics runs a ListUnits against a Wialon that first reports
// the session lost (error 1), then — after the gateway's one new session —
// its concurrency limit (error 10), both with HTTP 200, and checks what
// the metrics say: the upstream errors by kind, the token cache lookups
// and logins, the upstream HTTP calls by Wialon service; and that no
// tenant, credential, session or token reached a label.
func TestGatewayMetrics(t *testing.T) {
	var searches atomic.Int32
	wialonSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		var reply any
		switch r.FormValue("svc") {
		case "core/logout":
			reply = map[string]any{"error": 0}
		case "core/search_items":
			if searches.Add(1) == 1 {
				reply = map[string]any{"error": 1}
			} else {
				reply = map[string]any{"error": 10}
			}
		default:
			reply = map[string]any{"error": 4}
		}
		_ = json.NewEncoder(w).Encode(reply)
	}))
	t.Cleanup(wialonSrv.Close)

	m := telemetry.NewMetrics()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	rdb.AddHook(m.RedisHook())
	tr, err := transit.NewKeyring()
	if err != nil {
		t.Fatal(err)
	}
	allow, err := upstream.ParseAllowList(strings.TrimPrefix(wialonSrv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	var hookMints atomic.Int32 // a hook set before instrumenting still runs
	cacheOpts := gateway.InstrumentTokenCache(tokencache.Options{
		OnMint: func(tokencache.Key, time.Duration, error) { hookMints.Add(1) },
	}, m)
	base := http.DefaultTransport
	reg, err := provider.NewRegistry(provider.Env{HTTPClient: func(name string) *http.Client {
		return &http.Client{Transport: telemetry.InstrumentTransport(base, name, m)}
	}}, providers.All()...)
	if err != nil {
		t.Fatal(err)
	}
	sessions := &fakeSessions{baseURL: wialonSrv.URL}
	svc, err := gateway.New(gateway.Config{
		Sessions:      sessions,
		Providers:     reg,
		Cache:         tokencache.New(rdb, tr, cacheOpts),
		Limiter:       ratelimit.New(rdb, "fbtest:rl"),
		Redis:         rdb,
		AllowList:     allow,
		HandleKeys:    keys,
		Metrics:       m,
		PurgeInterval: -1,
		Logger:        slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	h, _, err := keys.New()
	if err != nil {
		t.Fatal(err)
	}
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+h))
	_, err = svc.ListUnits(ctx, &telematicsv1.ListUnitsRequest{PageSize: 5})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("ListUnits = %v, want ResourceExhausted (Wialon error 10)", err)
	}

	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"fleetbroker_gateway_upstream_errors_total", map[string]string{"provider": "wialon", "kind": "session_invalid"}, 1},
		{"fleetbroker_gateway_upstream_errors_total", map[string]string{"provider": "wialon", "kind": "rate_limited"}, 1},
		// The first flight missed; after the lost session was dropped the
		// second flight missed too and logged in again.
		{"fleetbroker_token_cache_lookups_total", map[string]string{"provider": "wialon", "kind": "wialon-eid", "result": "miss"}, 2},
		{"fleetbroker_token_cache_mints_total", map[string]string{"provider": "wialon", "kind": "wialon-eid", "result": "ok"}, 2},
		{"fleetbroker_token_cache_mint_duration_seconds", map[string]string{"provider": "wialon", "kind": "wialon-eid"}, 2},
		// The lost session's search, then the new session's, tried 4 times:
		// Wialon refused it for a concurrency limit (error 10), so it did
		// not run and is retried with backoff.
		{"fleetbroker_upstream_request_duration_seconds", map[string]string{"provider": "wialon", "endpoint": "core/search_items", "status": "200"}, 5},
	} {
		if got := metricValue(t, m, tt.name, tt.labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	if got := hookMints.Load(); got != 2 {
		t.Errorf("the OnMint hook set before InstrumentTokenCache ran %d times, want 2", got)
	}
	// Custody: the gateway asked the credentials service for each session
	// and never logged in upstream itself.
	if got := sessions.mints.Load(); got != 2 {
		t.Errorf("MintUpstreamSession called %d times, want 2", got)
	}
	if got := metricValue(t, m, "fleetbroker_upstream_request_duration_seconds", map[string]string{"provider": "wialon", "endpoint": "token/login", "status": "200"}); got != 0 {
		t.Errorf("the gateway logged in upstream itself %v times", got)
	}
	if metricValue(t, m, "fleetbroker_redis_command_duration_seconds", map[string]string{"command": "set", "result": "ok"}) == 0 {
		t.Error("no Redis SET recorded (the token cache stores the eid)")
	}

	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				if strings.Contains(l.GetValue(), metricsCanary) || strings.Contains(l.GetValue(), h) {
					t.Errorf("%s has label %s=%q", f.GetName(), l.GetName(), l.GetValue())
				}
			}
		}
	}
}

// metricValue is the counter value or histogram sample count of the series
// of name with exactly labels; 0 if there is none.
func metricValue(t *testing.T, m *telemetry.Metrics, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
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
			if s.GetHistogram() != nil {
				return float64(s.GetHistogram().GetSampleCount())
			}
			return s.GetCounter().GetValue()
		}
	}
	return 0
}

// TestInstrumentTokenCacheNil: without metrics the options are unchanged.
func TestInstrumentTokenCacheNil(t *testing.T) {
	opts := gateway.InstrumentTokenCache(tokencache.Options{Prefix: "x"}, nil)
	if opts.OnMint != nil || opts.OnLookup != nil || opts.Prefix != "x" {
		t.Errorf("InstrumentTokenCache(nil) changed the options: %+v", opts)
	}
}
