package gateway_test

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
	"github.com/fleetbroker/fleetbroker/test/testserver"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// Canary secrets: they must appear nowhere in Redis or the logs.
const (
	canaryToken   = "GwCanary0123456789abcdefGwCanary0123456789abcdefGwCanary0123456789abcdef"
	canaryAPIKey  = "gw-canary-api-key-51f0"
	canarySecret  = "gw-canary-secret-9a7c"
	canaryAccount = int64(777001)
	tenant        = "acme"
)

// syncBuffer collects log output for assertions.
type syncBuffer = testenv.LogBuffer

// stack is a credentials service and n gateway replicas sharing one real
// Redis and one real Vault, in front of one simulator.
type stack struct {
	sim     *simulator.Simulator
	simURL  string
	simSeen *upstreamLog
	// sim2 is a second upstream on another host (stackOptions.secondUpstream).
	sim2     *simulator.Simulator
	sim2URL  string
	sim2Seen *upstreamLog
	// services are the gateway replicas behind gateways.
	services []*gateway.Service
	simClock *atomic.Int64 // offset of the simulator's clock, in ns
	creds    credentialsv1.CredentialServiceClient
	sessions credentialsv1.SessionServiceClient
	gateways []telematicsv1.TelematicsServiceClient
	redis    redis.UniversalClient
	prefix   string
	logs     *syncBuffer
	// handleKeys are the credentials service's and every gateway's.
	handleKeys *handle.Keys
	// resolves counts the gateways' ResolveSession calls.
	resolves *atomic.Int64
	// credSvc is the credentials service; credentials builds another one
	// on the same Redis, Vault key and handle keys.
	credSvc     *credentials.Service
	credentials func(t *testing.T, cfg app.CredentialsConfig) credentialsv1.CredentialServiceClient
}

// countResolves counts ResolveSession calls on their way to the
// credentials service.
func countResolves(n *atomic.Int64) grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if method == credentialsv1.SessionService_ResolveSession_FullMethodName {
			n.Add(1)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
}

type stackOptions struct {
	replicas       int
	handleCacheTTL time.Duration
	// fleetupRate is FleetUp requests per second per account (default 1000,
	// so tests that are not about the rate budget do not wait for it).
	fleetupRate int
	// secondUpstream starts sim2, a second simulator on another host.
	secondUpstream bool
	// providers, if set, are the providers both services serve.
	providers []provider.Factory
	// extraAllowed are more host:port upstreams to allow.
	extraAllowed []string
	// wialonSessionTTL is --wialon-session-ttl (0: the default).
	wialonSessionTTL time.Duration
	// sim configures the simulator (its clock is the stack's).
	sim simulator.Config
}

func newStack(t *testing.T, opts stackOptions) *stack {
	t.Helper()
	if opts.replicas == 0 {
		opts.replicas = 1
	}
	if opts.fleetupRate == 0 {
		opts.fleetupRate = 1000
	}
	st := &stack{simClock: &atomic.Int64{}, logs: &syncBuffer{}, resolves: &atomic.Int64{}}
	simCfg := opts.sim
	simCfg.Now = func() time.Time { return time.Now().Add(time.Duration(st.simClock.Load())) }
	st.sim = simulator.New(simCfg)
	st.sim.AddWialonToken(canaryToken)
	st.sim.AddFleetUpAccount(canaryAPIKey, canaryAccount, canarySecret)
	st.simURL, st.simSeen = serveUpstream(t, st.sim.Handler())
	allowed := strings.TrimPrefix(st.simURL, "http://")
	if opts.secondUpstream {
		st.sim2 = simulator.New(simulator.Config{})
		st.sim2URL, st.sim2Seen = serveUpstream(t, st.sim2.Handler())
		allowed += "," + strings.TrimPrefix(st.sim2URL, "http://")
	}
	for _, a := range opts.extraAllowed {
		allowed += "," + a
	}
	logger := slog.New(slog.NewJSONHandler(st.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	rs := testenv.Redis(t)
	st.redis = rs.Client(t)
	st.prefix = testenv.RedisPrefix(t)
	vs := testenv.Vault(t)
	credTransit := newVault(t, vs, vs.NewKeyName(t))
	gwKey := vs.NewKeyName(t) // the gateway's data keys live under their own transit key

	var err error
	st.handleKeys, err = handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	credDeps := app.Deps{Logger: logger, Providers: opts.providers, HandleKeys: st.handleKeys,
		Store: store.NewRedis(st.redis, store.RedisOptions{Prefix: st.prefix}), Transit: credTransit}
	credSvc, err := app.NewCredentialsService(app.CredentialsConfig{AllowedUpstreams: allowed, UpstreamTimeout: 5 * time.Second}, credDeps)
	if err != nil {
		t.Fatal(err)
	}
	st.credSvc = credSvc
	credConn, dialCreds := testserver.ServeDial(t, logger, credSvc.Register)
	st.credentials = func(t *testing.T, cfg app.CredentialsConfig) credentialsv1.CredentialServiceClient {
		t.Helper()
		cfg.AllowedUpstreams, cfg.UpstreamTimeout = allowed, 5*time.Second
		d := credDeps
		d.Providers = nil
		svc, err := app.NewCredentialsService(cfg, d)
		if err != nil {
			t.Fatal(err)
		}
		return credentialsv1.NewCredentialServiceClient(testserver.Serve(t, logger, svc.Register))
	}
	st.creds = credentialsv1.NewCredentialServiceClient(credConn)
	st.sessions = credentialsv1.NewSessionServiceClient(credConn)

	for range opts.replicas {
		gw, err := app.NewGatewayService(app.GatewayConfig{
			RedisPrefix:      st.prefix,
			AllowedUpstreams: allowed,
			HandleCacheTTL:   opts.handleCacheTTL,
			FleetUpRate:      opts.fleetupRate,
			FleetUpBurst:     1,
			UpstreamTimeout:  5 * time.Second,
			PurgeInterval:    -1, // tests purge explicitly (PurgeRetired)
			WialonSessionTTL: opts.wialonSessionTTL,
		}, app.Deps{Logger: logger, Providers: opts.providers, HandleKeys: st.handleKeys,
			CredentialsConn: dialCreds(countResolves(st.resolves)), Redis: rs.Client(t), Transit: newVault(t, vs, gwKey)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(gw.Close)
		st.services = append(st.services, gw)
		st.gateways = append(st.gateways, telematicsv1.NewTelematicsServiceClient(testserver.Serve(t, logger, gw.Register)))
	}
	return st
}

func newVault(t *testing.T, vs testenv.VaultServer, key string) *transit.Vault {
	t.Helper()
	v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if err := v.EnsureKey(context.Background()); err != nil {
		t.Fatal(err)
	}
	return v
}

func (st *stack) putWialon(t *testing.T, id string) {
	t.Helper()
	_, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: st.simURL}}})
	if err != nil {
		t.Fatal(err)
	}
}

func (st *stack) putFleetUp(t *testing.T, id string) {
	t.Helper()
	_, err := st.creds.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{ApiKey: canaryAPIKey, AccountId: canaryAccount, Secret: canarySecret, BaseUrl: st.simURL}}})
	if err != nil {
		t.Fatal(err)
	}
}

// issue returns a context carrying a fresh handle for credential id.
func (st *stack) issue(t *testing.T, id string, scopes ...credentialsv1.Scope) (context.Context, string) {
	t.Helper()
	resp, err := st.sessions.IssueSession(context.Background(), &credentialsv1.IssueSessionRequest{TenantId: tenant, CredentialId: id, Scopes: scopes})
	if err != nil {
		t.Fatal(err)
	}
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+resp.GetHandle()), resp.GetHandle()
}

// dumpRedis returns every key and string value in Redis.
func (st *stack) dumpRedis(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	keys, err := st.redis.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		b.WriteString(k + "=")
		switch st.redis.Type(ctx, k).Val() {
		case "string":
			b.WriteString(st.redis.Get(ctx, k).Val())
		case "hash":
			fmt.Fprint(&b, st.redis.HGetAll(ctx, k).Val())
		case "zset":
			fmt.Fprint(&b, st.redis.ZRange(ctx, k, 0, -1).Val())
		}
		b.WriteString("\n")
	}
	return b.String()
}

func wantCode(t *testing.T, err error, code codes.Code) *status.Status {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("got %v, want %v", err, code)
	}
	return st
}

func TestOneUpstreamLoginForManyCallersAndReplicas(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 3, handleCacheTTL: gateway.DefaultHandleCacheTTL})
	st.putWialon(t, "w")
	st.putFleetUp(t, "f")
	// Validation logged in once each; count from here.
	before := st.sim.Stats()
	wctx, _ := st.issue(t, "w")
	fctx, _ := st.issue(t, "f")

	const callers = 200
	var wg sync.WaitGroup
	errs := make(chan error, 2*callers)
	for i := range callers {
		gw := st.gateways[i%len(st.gateways)]
		for _, ctx := range []context.Context{wctx, fctx} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := gw.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{})
				if err == nil && len(resp.GetPositions()) == 0 {
					err = fmt.Errorf("no positions")
				}
				errs <- err
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	after := st.sim.Stats()
	if got := after.WialonLogins - before.WialonLogins; got != 1 {
		t.Errorf("%d concurrent callers over %d replicas caused %d Wialon logins, want 1", callers, len(st.gateways), got)
	}
	if got := after.FleetUpMints - before.FleetUpMints; got != 1 {
		t.Errorf("%d concurrent callers over %d replicas caused %d FleetUp mints, want 1", callers, len(st.gateways), got)
	}

	// Nothing secret in Redis or the logs: not the customer's secrets, not
	// the upstream session, not the JWT, not a handle.
	dump, logs := st.dumpRedis(t), st.logs.String()
	for _, canary := range []string{canaryToken, canaryAPIKey, canarySecret} {
		if strings.Contains(dump, canary) || strings.Contains(logs, canary) {
			t.Errorf("secret %.8s… found in Redis or logs", canary)
		}
	}
	// A JWT is two base64url JSON objects and a dot between ("eyJ…" twice):
	// "eyJ" alone occurs by chance in the random base64 of a ciphertext.
	if jwt := regexp.MustCompile(`eyJ[A-Za-z0-9_-]+\.eyJ`); jwt.MatchString(dump) || jwt.MatchString(logs) {
		t.Error("a JWT found in Redis or logs")
	}
	if strings.Contains(dump, "fbs_") || strings.Contains(logs, "fbs_") { // the handle prefix
		t.Error("a session handle found in Redis or logs")
	}
	if !strings.Contains(dump, ":gw:") {
		t.Fatal("the token cache wrote nothing to Redis: the scan above proves nothing")
	}
}

func TestExpiredJWTIsMintedOnceMore(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	before := st.sim.Stats().FleetUpMints
	// Two hours pass for FleetUp: the cached JWT is expired there (401).
	st.simClock.Store(int64(2 * time.Hour))
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := st.gateways[i%2].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := st.sim.Stats().FleetUpMints - before; got != 1 {
		t.Fatalf("expired JWT caused %d mints, want 1", got)
	}
}

func TestWialonSessionLossCausesOneRelogin(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	before := st.sim.Stats().WialonLogins
	st.sim.ExpireWialonSessions() // every call now answers error 1
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := st.gateways[i%2].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := st.sim.Stats().WialonLogins - before; got != 1 {
		t.Fatalf("error 1 caused %d re-logins, want 1", got)
	}
}

func TestRevokedHandleStopsWithinTheCacheBound(t *testing.T) {
	const bound = time.Second
	st := newStack(t, stackOptions{handleCacheTTL: bound})
	st.putWialon(t, "w")
	ctx, h := st.issue(t, "w")
	gw := st.gateways[0]
	if _, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	stream, err := gw.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{MinInterval: durationpb.New(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.sessions.RevokeSession(context.Background(), &credentialsv1.RevokeSessionRequest{Handle: h}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	for {
		_, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
		if status.Code(err) == codes.Unauthenticated {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if time.Since(revoked) > bound+500*time.Millisecond {
			t.Fatalf("revoked handle still works %v after revocation (bound %v)", time.Since(revoked), bound)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for {
		_, err := stream.Recv()
		if err == nil {
			continue
		}
		wantCode(t, err, codes.Unauthenticated)
		if d := time.Since(revoked); d > 2*bound+time.Second {
			t.Fatalf("watch ended %v after revocation, want within about %v", d, bound)
		}
		break
	}
}

func TestCallerErrors(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putWialon(t, "w")
	st.putFleetUp(t, "f")
	gw := st.gateways[0]
	readCtx, _ := st.issue(t, "w")
	rawCtx, _ := st.issue(t, "f", credentialsv1.Scope_SCOPE_RAW)
	bad := func(v string) context.Context {
		return metadata.AppendToOutgoingContext(context.Background(), "authorization", v)
	}
	tests := []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"no handle", func() error {
			_, err := gw.ListUnits(context.Background(), &telematicsv1.ListUnitsRequest{})
			return err
		}, codes.Unauthenticated},
		{"not bearer", func() error {
			_, err := gw.ListUnits(bad("Basic abc"), &telematicsv1.ListUnitsRequest{})
			return err
		}, codes.Unauthenticated},
		{"malformed handle", func() error {
			_, err := gw.ListUnits(bad("Bearer fbs_nope"), &telematicsv1.ListUnitsRequest{})
			return err
		}, codes.Unauthenticated},
		{"raw call with read scope", func() error {
			_, err := gw.CallProvider(readCtx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{Wialon: &telematicsv1.WialonCall{Svc: "core/search_items"}}})
			return err
		}, codes.PermissionDenied},
		{"read call with raw-only scope", func() error {
			_, err := gw.ListUnits(rawCtx, &telematicsv1.ListUnitsRequest{})
			return err
		}, codes.PermissionDenied},
		{"wialon unit id not a number", func() error {
			_, err := gw.ListTrips(readCtx, &telematicsv1.ListTripsRequest{UnitId: "abc", StartTime: timestamppb.New(time.Now().Add(-time.Hour)), EndTime: timestamppb.Now()})
			return err
		}, codes.InvalidArgument},
		{"history range reversed", func() error {
			_, err := gw.GetPositionHistory(readCtx, &telematicsv1.GetPositionHistoryRequest{UnitId: "1", StartTime: timestamppb.Now(), EndTime: timestamppb.New(time.Now().Add(-time.Hour))})
			return err
		}, codes.InvalidArgument},
		{"raw call to the other provider", func() error {
			_, err := gw.CallProvider(rawCtx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{Wialon: &telematicsv1.WialonCall{Svc: "core/search_items"}}})
			return err
		}, codes.FailedPrecondition},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { wantCode(t, tt.call(), tt.code) })
	}
}

func TestRateLimitedUpstreamAsksToWait(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	st.sim.SetFaults(simulator.Faults{RateLimitRate: 1})
	_, err := st.gateways[0].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{})
	s := wantCode(t, err, codes.ResourceExhausted)
	var retry *errdetails.RetryInfo
	for _, d := range s.Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 {
		t.Fatalf("RESOURCE_EXHAUSTED without a RetryInfo delay: %v", s.Details())
	}
}

func TestRejectedCredentialIsReported(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	// The customer rotates the secret at FleetUp but not in the broker.
	st.sim.AddFleetUpAccount(canaryAPIKey, canaryAccount, "rotated-elsewhere")
	_, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	wantCode(t, err, codes.FailedPrecondition)
	got, err := st.creds.GetCredential(context.Background(), &credentialsv1.GetCredentialRequest{TenantId: tenant, CredentialId: "f"})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED {
		t.Fatalf("credential state %v, want REJECTED", got.GetCredential().GetValidationState())
	}
}

func TestNormalizedReads(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putWialon(t, "w")
	st.putFleetUp(t, "f")
	for _, id := range []string{"w", "f"} {
		t.Run(id, func(t *testing.T) {
			ctx, _ := st.issue(t, id, credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
			gw := st.gateways[0]
			var all []*telematicsv1.Unit
			token := ""
			for {
				page, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{PageSize: 20, PageToken: token})
				if err != nil {
					t.Fatal(err)
				}
				all = append(all, page.GetUnits()...)
				if token = page.GetNextPageToken(); token == "" {
					break
				}
			}
			if len(all) != 50 || all[0].GetLastPosition() == nil || all[0].GetName() == "" {
				t.Fatalf("want the 50-unit demo fleet with positions, got %d units (first %v)", len(all), all[0])
			}
			unit := all[3].GetUnitId()
			latest, err := gw.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{UnitIds: []string{unit}})
			if err != nil || len(latest.GetPositions()) != 1 || latest.GetPositions()[0].GetUnitId() != unit {
				t.Fatalf("latest positions of %s: %v, %v", unit, latest, err)
			}
			end := time.Now()
			start := end.Add(-6 * time.Hour)
			hist, err := gw.GetPositionHistory(ctx, &telematicsv1.GetPositionHistoryRequest{UnitId: unit, StartTime: timestamppb.New(start), EndTime: timestamppb.New(end)})
			if err != nil || len(hist.GetPositions()) == 0 {
				t.Fatalf("history: %d positions, %v", len(hist.GetPositions()), err)
			}
			for _, p := range hist.GetPositions() {
				if tm := p.GetTime().AsTime(); tm.Before(start.Add(-time.Second)) || tm.After(end.Add(time.Second)) {
					t.Fatalf("history position at %v outside [%v, %v]", tm, start, end)
				}
			}
			trips, err := gw.ListTrips(ctx, &telematicsv1.ListTripsRequest{UnitId: unit, StartTime: timestamppb.New(end.Add(-48 * time.Hour)), EndTime: timestamppb.New(end)})
			if err != nil || len(trips.GetTrips()) == 0 || trips.GetTrips()[0].GetDistanceM() <= 0 {
				t.Fatalf("trips: %v, %v", trips, err)
			}
			var raw *telematicsv1.CallProviderResponse
			if id == "w" {
				raw, err = gw.CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{Wialon: &telematicsv1.WialonCall{Svc: "core/search_items"}}})
			} else {
				raw, err = gw.CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Fleetup{Fleetup: &telematicsv1.FleetUpCall{Method: "POST", Path: "/devices"}}})
			}
			if err != nil || raw.GetHttpStatus() != 200 || !strings.HasPrefix(strings.TrimSpace(raw.GetJson()), "{") && !strings.HasPrefix(strings.TrimSpace(raw.GetJson()), "[") {
				t.Fatalf("raw call: %v, %v", raw, err)
			}
		})
	}
}

func TestWatchersShareOnePoll(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putFleetUp(t, "f")
	gw := st.gateways[0]
	const watchers = 10
	streams := make([]telematicsv1.TelematicsService_WatchPositionsClient, watchers)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range streams {
		hctx, _ := st.issue(t, "f")
		md, _ := metadata.FromOutgoingContext(hctx)
		s, err := gw.WatchPositions(metadata.NewOutgoingContext(ctx, md), &telematicsv1.WatchPositionsRequest{MinInterval: durationpb.New(time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		streams[i] = s
	}
	first, err := streams[0].Recv()
	if err != nil || len(first.GetPositions()) != 50 {
		t.Fatalf("first message should hold all 50 positions: %d, %v", len(first.GetPositions()), err)
	}
	before := st.sim.Stats().Requests["fleetup POST /gpsdata/device-last-location"]
	// Each watcher receives a few updates; the demo fleet moves, so every
	// poll changes something.
	for _, s := range streams[1:] {
		for range 2 {
			if _, err := s.Recv(); err != nil {
				t.Fatal(err)
			}
		}
	}
	start := time.Now()
	time.Sleep(3 * time.Second)
	polls := st.sim.Stats().Requests["fleetup POST /gpsdata/device-last-location"] - before
	elapsed := time.Since(start) + 3*time.Second // upper bound of the window since before
	if max := int64(elapsed/time.Second) + 2; polls > max {
		t.Fatalf("%d watchers caused %d upstream polls in %v; one shared 1 s poll allows at most %d", watchers, polls, elapsed, max)
	}
	if polls == 0 {
		t.Fatal("no polls at all")
	}
}

func TestFleetUpRateBudgetIsSharedByReplicas(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2, fleetupRate: 2})
	st.putFleetUp(t, "f")
	ctx, _ := st.issue(t, "f")
	before := st.sim.Stats().FleetUpCallsByAccount[canaryAccount] + st.sim.Stats().FleetUpMintsByAccount[canaryAccount]
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 2*time.Second {
				if _, err := st.gateways[i].GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	calls := st.sim.Stats().FleetUpCallsByAccount[canaryAccount] + st.sim.Stats().FleetUpMintsByAccount[canaryAccount] - before
	// 2 requests/s shared by both replicas, plus a burst of 1.
	if allowed := int64(elapsed.Seconds()*2) + 2; calls > allowed {
		t.Fatalf("two replicas sent %d FleetUp requests in %v; the shared budget allows %d", calls, elapsed, allowed)
	}
	if calls < 2 {
		t.Fatalf("only %d FleetUp requests in %v: the budget is not being used", calls, elapsed)
	}
}
