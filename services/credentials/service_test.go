package credentials_test

import (
	"context"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/simulator"
	"github.com/fleetbroker/fleetbroker/test/testserver"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// canaryToken is a valid-looking Wialon token that must never show up in a
// log line, an error, or Redis.
const canaryToken = "CANARY0123456789abcdefCANARY0123456789abcdefCANARY0123456789abcdefCANARY"

// canaryToken2 is the customer's next token, after Wialon refused the first.
const canaryToken2 = "CANARY2123456789abcdefCANARY2123456789abcdefCANARY2123456789abcdefCANAR2"

const canaryFleetUpSecret = "canary-fleetup-secret-7d1f0c"

// backend is one combination of store and transit the suite runs on.
type backend struct {
	name string
	// open returns the Redis client and key prefix of a store, and a
	// transit that can rotate.
	open func(t *testing.T) (redis.UniversalClient, string, transit.Rotatable)
}

func backends() []backend {
	return []backend{
		{"redis+vault", func(t *testing.T) (redis.UniversalClient, string, transit.Rotatable) {
			srv := testenv.Redis(t)
			client := srv.Client(t)
			prefix := testenv.RedisPrefix(t)
			vs := testenv.Vault(t)
			v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: vs.NewKeyName(t)}, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { v.Close() })
			if err := v.EnsureKey(context.Background()); err != nil {
				t.Fatal(err)
			}
			return client, prefix, v
		}},
		{"miniredis+keyring", func(t *testing.T) (redis.UniversalClient, string, transit.Rotatable) {
			mini := miniredis.RunT(t)
			client := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{mini.Addr()}})
			t.Cleanup(func() { client.Close() })
			k, err := transit.NewKeyring()
			if err != nil {
				t.Fatal(err)
			}
			return client, "fb", k
		}},
	}
}

func dumpRedis(t *testing.T, client redis.UniversalClient, prefix string) func() string {
	return func() string {
		ctx := context.Background()
		var b strings.Builder
		keys, err := client.Keys(ctx, prefix+"*").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			b.WriteString(k + "\n")
			switch client.Type(ctx, k).Val() {
			case "string":
				b.WriteString(client.Get(ctx, k).Val())
			case "hash":
				for f, v := range client.HGetAll(ctx, k).Val() {
					b.WriteString(f + "=" + v + "\n")
				}
			case "zset":
				b.WriteString(strings.Join(client.ZRange(ctx, k, 0, -1).Val(), "\n"))
			case "set":
				b.WriteString(strings.Join(client.SMembers(ctx, k).Val(), "\n"))
			}
			b.WriteString("\n")
		}
		return b.String()
	}
}

// harness is one running credentials service on bufconn.
type harness struct {
	creds    credentialsv1.CredentialServiceClient
	sessions credentialsv1.SessionServiceClient
	svc      *credentials.Service
	store    store.Store
	transit  transit.Rotatable
	sim      *simulator.Simulator
	simURL   string
	logs     *syncBuffer
	dump     func() string
	// rdb and prefix are the store's Redis client and key prefix.
	rdb    redis.UniversalClient
	prefix string
	keys   *handle.Keys
}

// harnessOptions vary the service under test.
type harnessOptions struct {
	// writeLegacy is --write-legacy-formats.
	writeLegacy bool
	// refuseLegacyAD is --legacy-associated-data=false.
	refuseLegacyAD bool
	// adjust change the configuration further.
	adjust []func(*app.CredentialsConfig)
	// sim configures the simulator (newHarnessWith only).
	sim simulator.Config
}

// syncBuffer collects log output for assertions.
type syncBuffer = testenv.LogBuffer

func newHarness(t *testing.T, be backend, adjust ...func(*app.CredentialsConfig)) *harness {
	t.Helper()
	return newHarnessWith(t, be, harnessOptions{adjust: adjust})
}

func newHarnessWith(t *testing.T, be backend, opts harnessOptions) *harness {
	t.Helper()
	rdb, prefix, tr := be.open(t)
	keys, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	sim := simulator.New(opts.sim)
	sim.AddWialonToken(canaryToken)
	sim.AddFleetUpAccount("canary-api-key", 4242, canaryFleetUpSecret)
	simServer := httptest.NewServer(sim.Handler())
	t.Cleanup(simServer.Close)
	h := &harness{transit: tr, sim: sim, simURL: simServer.URL, logs: &syncBuffer{}, rdb: rdb, prefix: prefix, keys: keys}
	h.start(t, opts)
	return h
}

// start runs a credentials service for h on h's Redis, transit, keys and
// simulator, and points h's clients at it.
func (h *harness) start(t *testing.T, opts harnessOptions) {
	t.Helper()
	logger := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h.store = store.NewRedis(h.rdb, store.RedisOptions{Prefix: h.prefix})
	cfg := app.CredentialsConfig{
		AllowedUpstreams:           strings.TrimPrefix(h.simURL, "http://"),
		MaxSessionTTL:              time.Hour,
		UpstreamTimeout:            2 * time.Second,
		WriteLegacyFormats:         opts.writeLegacy,
		RefuseLegacyAssociatedData: opts.refuseLegacyAD,
	}
	for _, f := range opts.adjust {
		f(&cfg)
	}
	svc, err := app.NewCredentialsService(cfg, app.Deps{Logger: logger, Store: h.store, Transit: h.transit, HandleKeys: h.keys})
	if err != nil {
		t.Fatal(err)
	}
	conn, _ := testserver.ServeConfig(t, server.Config{Logger: logger, Reflection: true}, svc.Register)
	h.creds, h.sessions, h.svc = credentialsv1.NewCredentialServiceClient(conn), credentialsv1.NewSessionServiceClient(conn), svc
	h.dump = dumpRedis(t, h.rdb, h.prefix)
}

// replica returns another replica of h's service (same Redis, transit,
// keys and simulator), configured by opts, on a Redis client of its own
// whose commands the returned function counts from now on.
func (h *harness) replica(t *testing.T, opts harnessOptions) (*harness, func() int) {
	t.Helper()
	base, ok := h.rdb.(*redis.Client)
	if !ok {
		t.Fatalf("replica needs a *redis.Client, not %T", h.rdb)
	}
	client := redis.NewClient(base.Options())
	t.Cleanup(func() { _ = client.Close() })
	counter := &commandCounter{}
	client.AddHook(counter)
	r := &harness{transit: h.transit, sim: h.sim, simURL: h.simURL, logs: h.logs, rdb: client, prefix: h.prefix, keys: h.keys}
	r.start(t, opts)
	// Connect first: the connection's handshake is not the service's doing.
	if err := client.Ping(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	counter.n.Store(0)
	return r, func() int { return int(counter.n.Load()) }
}

// commandCounter counts the Redis commands of a client.
type commandCounter struct{ n atomic.Int64 }

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.n.Add(1); return next(ctx, cmd) }
}
func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { c.n.Add(int64(len(cmds))); return next(ctx, cmds) }
}

// forEachBackend runs test against every backend, so dev's embedded
// backends are held to the same behaviour as production's.
func forEachBackend(t *testing.T, test func(t *testing.T, h *harness)) {
	for _, be := range backends() {
		t.Run(be.name, func(t *testing.T) { test(t, newHarness(t, be)) })
	}
}

func (h *harness) wialonPut(tenant, id string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: h.simURL}}}
}

func (h *harness) fleetupPut(tenant, id string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{ApiKey: "canary-api-key", AccountId: 4242, Secret: canaryFleetUpSecret, BaseUrl: h.simURL}}}
}

// assertNoCanary fails if a secret planted by the tests shows up in the
// service's logs, in err, or anywhere in Redis.
func (h *harness) assertNoCanary(t *testing.T, errs ...error) {
	t.Helper()
	for _, canary := range []string{canaryToken, canaryFleetUpSecret, "canary-api-key"} {
		if strings.Contains(h.logs.String(), canary) {
			t.Errorf("secret %q found in logs", canary[:10])
		}
		if strings.Contains(h.dump(), canary) {
			t.Errorf("secret %q found in Redis", canary[:10])
		}
		for _, err := range errs {
			if err != nil && strings.Contains(err.Error(), canary) {
				t.Errorf("secret %q found in error %v", canary[:10], err)
			}
		}
	}
}

func wantCode(t *testing.T, err error, code codes.Code) *status.Status {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("got %v, want %v", err, code)
	}
	return st
}

// wantUndecryptable: a stored secret that does not open is
// FAILED_PRECONDITION with reason CREDENTIAL_UNDECRYPTABLE.
func wantUndecryptable(t *testing.T, err error) {
	t.Helper()
	wantCode(t, err, codes.FailedPrecondition)
	if r := apierr.Reason(err); r != apierr.ReasonCredentialUndecryptable {
		t.Fatalf("reason %q, want %q (%v)", r, apierr.ReasonCredentialUndecryptable, err)
	}
}

// openSecret makes the service open the secret behind handle the way the
// gateway does: resolve it, then mint an upstream session with it.
func (h *harness) openSecret(ctx context.Context, handle string) error {
	res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: handle})
	if err != nil {
		return err
	}
	_, err = h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
	return err
}

func badRequestFields(st *status.Status) []string {
	var fields []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	return fields
}

func TestInvalidInputNamesTheField(t *testing.T) {
	h := newHarness(t, backends()[1])
	ctx := context.Background()
	token71, token73 := canaryToken[:71], canaryToken+"A"
	tests := []struct {
		name  string
		call  func() error
		field string
	}{
		{"wialon token of 71 characters", func() error {
			req := h.wialonPut("t1", "c1")
			req.GetWialon().Token = token71
			_, err := h.creds.PutCredential(ctx, req)
			return err
		}, "wialon.token"},
		{"wialon token of 73 characters", func() error {
			req := h.wialonPut("t1", "c1")
			req.GetWialon().Token = token73
			_, err := h.creds.PutCredential(ctx, req)
			return err
		}, "wialon.token"},
		{"empty tenant", func() error {
			_, err := h.creds.PutCredential(ctx, h.wialonPut("", "c1"))
			return err
		}, "tenant_id"},
		{"no secret", func() error {
			_, err := h.creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: "t1", CredentialId: "c1"})
			return err
		}, "secret"},
		{"fleetup account id zero", func() error {
			req := h.fleetupPut("t1", "c1")
			req.GetFleetup().AccountId = 0
			_, err := h.creds.PutCredential(ctx, req)
			return err
		}, "fleetup.account_id"},
		{"base url not on the allow-list", func() error {
			req := h.wialonPut("t1", "c1")
			req.GetWialon().BaseUrl = "https://169.254.169.254"
			_, err := h.creds.PutCredential(ctx, req)
			return err
		}, "wialon.base_url"},
		{"ttl above the maximum", func() error {
			_, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "t1", CredentialId: "c1", Ttl: durationpb.New(2 * time.Hour)})
			return err
		}, "ttl"},
		{"unspecified scope", func() error {
			_, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "t1", CredentialId: "c1", Scopes: []credentialsv1.Scope{0}})
			return err
		}, "scopes[0]"},
		{"malformed handle on revoke", func() error {
			_, err := h.sessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: "fbs_nope"})
			return err
		}, "handle"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			st := wantCode(t, err, codes.InvalidArgument)
			fields := badRequestFields(st)
			if len(fields) == 0 || !strings.Contains(strings.Join(fields, ","), tt.field) {
				t.Fatalf("BadRequest fields %v do not name %q (status: %v)", fields, tt.field, err)
			}
			h.assertNoCanary(t, err)
		})
	}
	if _, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "t1", CredentialId: "c1"}); status.Code(err) != codes.NotFound {
		t.Fatalf("rejected puts stored something: %v", err)
	}
}

func TestCredentialLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		req := h.wialonPut("acme", "fleet-1")
		req.Labels = map[string]string{"team": "ops"}
		put, err := h.creds.PutCredential(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		c := put.GetCredential()
		if !put.GetCreated() || c.GetVersion() != 1 || c.GetProvider() != credentialsv1.Provider_PROVIDER_WIALON ||
			c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID || c.GetUpstreamUser() == "" ||
			!strings.HasPrefix(c.GetFingerprint(), "hmac-sha256:") || c.GetLabels()["team"] != "ops" || c.GetBaseUrl() != h.simURL {
			t.Fatalf("unexpected credential after put: %v", c)
		}

		// Rotation: same id, new secret → version 2, new fingerprint, create time kept.
		rot := h.fleetupPut("acme", "fleet-1")
		put2, err := h.creds.PutCredential(ctx, rot)
		if err != nil {
			t.Fatal(err)
		}
		c2 := put2.GetCredential()
		if put2.GetCreated() || c2.GetVersion() != 2 || c2.GetFingerprint() == c.GetFingerprint() ||
			!c2.GetCreateTime().AsTime().Equal(c.GetCreateTime().AsTime()) || c2.GetFleetupAccountId() != 4242 {
			t.Fatalf("unexpected credential after rotation: %v", c2)
		}
		// Putting the same secret again keeps the fingerprint.
		put3, err := h.creds.PutCredential(ctx, rot)
		if err != nil {
			t.Fatal(err)
		}
		if put3.GetCredential().GetFingerprint() != c2.GetFingerprint() || put3.GetCredential().GetVersion() != 3 {
			t.Fatalf("same secret, different fingerprint or version: %v", put3.GetCredential())
		}

		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "fleet-1"})
		if err != nil || got.GetCredential().GetVersion() != 3 {
			t.Fatalf("get: %v %v", got, err)
		}
		for _, id := range []string{"a", "b", "c"} {
			skip := h.wialonPut("acme", id)
			skip.SkipValidation = true
			if _, err := h.creds.PutCredential(ctx, skip); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("other-tenant", "x")); err != nil {
			t.Fatal(err)
		}
		var ids []string
		token := ""
		for {
			page, err := h.creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: "acme", PageSize: 3, PageToken: token})
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range page.GetCredentials() {
				ids = append(ids, c.GetCredentialId())
				if c.GetCredentialId() != "fleet-1" && c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_NOT_VALIDATED {
					t.Errorf("skip_validation credential %s has state %v", c.GetCredentialId(), c.GetValidationState())
				}
			}
			if token = page.GetNextPageToken(); token == "" {
				break
			}
		}
		if strings.Join(ids, ",") != "a,b,c,fleet-1" {
			t.Fatalf("list = %v, want a,b,c,fleet-1", ids)
		}
		if _, err := h.creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: "acme", PageToken: "garbage!"}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("bad page token: %v, want InvalidArgument", err)
		}

		if _, err := h.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "fleet-1"}); err != nil {
			t.Fatal(err)
		}
		_, err = h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "fleet-1"})
		wantCode(t, err, codes.NotFound)
		_, err = h.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "fleet-1"})
		wantCode(t, err, codes.NotFound)
		h.assertNoCanary(t, err)
	})
}

func TestProviderAnswersOnPut(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		bad := h.wialonPut("acme", "bad")
		bad.GetWialon().Token = strings.Repeat("b", 72)
		_, err := h.creds.PutCredential(ctx, bad)
		wantCode(t, err, codes.FailedPrecondition)
		badFU := h.fleetupPut("acme", "bad")
		badFU.GetFleetup().Secret = "wrong-secret"
		_, err2 := h.creds.PutCredential(ctx, badFU)
		wantCode(t, err2, codes.FailedPrecondition)

		// An upstream that cannot be reached: nothing stored, UNAVAILABLE.
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		deadURL := "http://" + lis.Addr().String()
		lis.Close()
		h2 := *h
		h2.simURL = deadURL
		down := h2.wialonPut("acme", "down")
		_, err3 := h.creds.PutCredential(ctx, down)
		// The dead address is not on the allow-list: that check comes first.
		wantCode(t, err3, codes.InvalidArgument)

		h.sim.SetFaults(simulator.Faults{ErrorRate: 1})
		_, err4 := h.creds.PutCredential(ctx, h.wialonPut("acme", "down"))
		wantCode(t, err4, codes.Unavailable)
		h.sim.SetFaults(simulator.Faults{})

		for _, id := range []string{"bad", "down"} {
			_, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: id})
			wantCode(t, err, codes.NotFound)
		}
		h.assertNoCanary(t, err, err2, err3, err4)
	})
}

func TestValidateCredentialRecordsTheAnswer(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		req := h.fleetupPut("acme", "fu")
		req.SkipValidation = true
		req.GetFleetup().Secret = "not-the-secret"
		if _, err := h.creds.PutCredential(ctx, req); err != nil {
			t.Fatal(err)
		}
		resp, err := h.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: "fu"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED || resp.GetCredential().GetValidateTime() == nil {
			t.Fatalf("want REJECTED with a validate time, got %v", resp.GetCredential())
		}
		_, err = h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "fu"})
		wantCode(t, err, codes.FailedPrecondition)

		good := h.fleetupPut("acme", "fu")
		good.SkipValidation = true
		if _, err := h.creds.PutCredential(ctx, good); err != nil {
			t.Fatal(err)
		}
		resp, err = h.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: "fu"})
		if err != nil || resp.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID {
			t.Fatalf("want VALID, got %v, %v", resp.GetCredential(), err)
		}
		h.assertNoCanary(t, err)
	})
}

func TestSessions(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w",
			Scopes: []credentialsv1.Scope{credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW}})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(issued.GetHandle(), "fbs_") || !strings.HasPrefix(issued.GetSessionId(), "ses_") {
			t.Fatalf("unexpected issue response shape")
		}
		if d := time.Until(issued.GetExpireTime().AsTime()); d < 14*time.Minute || d > 15*time.Minute {
			t.Fatalf("default ttl gives expiry in %v, want 15m", d)
		}
		res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
		if err != nil {
			t.Fatal(err)
		}
		if res.GetTenantId() != "acme" || res.GetCredentialId() != "w" || res.GetCredentialVersion() != 1 || len(res.GetScopes()) != 2 || res.GetBaseUrl() != h.simURL {
			t.Fatalf("unexpected resolution %v", res)
		}
		minted, err := h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: issued.GetHandle(), CredentialGeneration: res.GetCredentialGeneration()})
		if err != nil {
			t.Fatalf("MintUpstreamSession: %v", err)
		}
		var eid credentialsv1.WialonUpstreamSession
		if err := minted.GetUpstreamSession().UnmarshalTo(&eid); err != nil || eid.GetEid() == "" {
			t.Fatalf("MintUpstreamSession gave no Wialon session: %v, %v", minted, err)
		}

		// Nothing that is not a live handle resolves, and every failure looks the same.
		other, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w", Ttl: durationpb.New(time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		if len(other.GetScopes()) != 1 || other.GetScopes()[0] != credentialsv1.Scope_SCOPE_READ {
			t.Fatalf("no scopes should mean [SCOPE_READ], got %v", other.GetScopes())
		}
		revoke, err := h.sessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: issued.GetHandle()})
		if err != nil || revoke.GetSessionId() != issued.GetSessionId() {
			t.Fatalf("revoke: %v %v", revoke, err)
		}
		_, err = h.sessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: issued.GetHandle()})
		wantCode(t, err, codes.NotFound)
		time.Sleep(1100 * time.Millisecond) // let the 1 s session expire
		for name, handle := range map[string]string{
			"revoked":   issued.GetHandle(),
			"expired":   other.GetHandle(),
			"malformed": "fbs_" + strings.Repeat("A", 49),
		} {
			_, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: handle})
			wantCode(t, err, codes.Unauthenticated)
			_, err = h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("%s handle: MintUpstreamSession = %v", name, err)
			}
		}

		// Deleting the credential revokes its live sessions.
		live, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil {
			t.Fatal(err)
		}
		del, err := h.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil || del.GetRevokedSessions() != 1 {
			t.Fatalf("delete: %v revoked, err %v; want 1", del.GetRevokedSessions(), err)
		}
		_, err = h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: live.GetHandle()})
		wantCode(t, err, codes.Unauthenticated)
		// Re-creating the credential does not bring old sessions back.
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		_, err = h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: live.GetHandle()})
		wantCode(t, err, codes.Unauthenticated)
		_, err = h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "missing"})
		wantCode(t, err, codes.NotFound)

		for _, hd := range []string{issued.GetHandle(), other.GetHandle(), live.GetHandle()} {
			if strings.Contains(h.logs.String(), hd) || strings.Contains(h.dump(), hd) {
				t.Fatal("a handle appears in logs or Redis")
			}
		}
		h.assertNoCanary(t, err)
	})
}

func TestReportRejection(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.fleetupPut("acme", "fu")); err != nil {
			t.Fatal(err)
		}
		issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "fu"})
		if err != nil {
			t.Fatal(err)
		}
		// A stale report (older version) changes nothing.
		if _, err := h.sessions.ReportRejection(ctx, &credentialsv1.ReportRejectionRequest{Handle: issued.GetHandle(), CredentialVersion: 7, Reason: "fleetup 401"}); err != nil {
			t.Fatal(err)
		}
		got, _ := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "fu"})
		if got.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID {
			t.Fatalf("stale report changed state to %v", got.GetCredential().GetValidationState())
		}
		if _, err := h.sessions.ReportRejection(ctx, &credentialsv1.ReportRejectionRequest{Handle: issued.GetHandle(), CredentialVersion: 1, Reason: "fleetup 401"}); err != nil {
			t.Fatal(err)
		}
		got, _ = h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "fu"})
		if got.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED {
			t.Fatalf("report did not mark the credential rejected: %v", got.GetCredential())
		}
	})
}

func TestCiphertextIsBoundToItsRow(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		for _, target := range []struct{ tenant, id string }{{"acme", "victim"}, {"evil", "victim"}} {
			req := h.fleetupPut(target.tenant, target.id)
			req.SkipValidation = true
			if _, err := h.creds.PutCredential(ctx, req); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "source")); err != nil {
			t.Fatal(err)
		}
		src, err := h.store.GetCredential(ctx, "acme", "source")
		if err != nil {
			t.Fatal(err)
		}
		for _, target := range []struct{ tenant, id string }{{"acme", "victim"}, {"evil", "victim"}} {
			victim, err := h.store.GetCredential(ctx, target.tenant, target.id)
			if err != nil {
				t.Fatal(err)
			}
			// An attacker with Redis write access copies the ciphertext over.
			if err := h.store.UpdateCiphertext(ctx, target.tenant, target.id, victim.Version, src.Ciphertext, src.ADVersion); err != nil {
				t.Fatal(err)
			}
			issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: target.tenant, CredentialId: target.id})
			if err != nil {
				t.Fatal(err)
			}
			// It does not decrypt there: the caller is told to put the
			// credential again, and never gets the source's secret.
			res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
			if err != nil {
				t.Fatal(err)
			}
			_, err = h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: issued.GetHandle(), CredentialGeneration: res.GetCredentialGeneration()})
			wantCode(t, err, codes.FailedPrecondition)
			if r := apierr.Reason(err); r != apierr.ReasonCredentialUndecryptable {
				t.Errorf("reason %q, want %q", r, apierr.ReasonCredentialUndecryptable)
			}
			_, err = h.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: target.tenant, CredentialId: target.id})
			wantCode(t, err, codes.FailedPrecondition)
			h.assertNoCanary(t, err)
		}
	})
}

func TestRewrapAfterKeyRotation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		for _, id := range []string{"w1", "w2", "w3"} {
			if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", id)); err != nil {
				t.Fatal(err)
			}
		}
		before, _ := h.store.GetCredential(ctx, "acme", "w1")
		if err := h.transit.RotateKey(ctx); err != nil {
			t.Fatal(err)
		}
		p, err := h.svc.Rewrap(ctx, nil)
		if err != nil || p.Seen != 3 || p.Rewrapped != 3 {
			t.Fatalf("rewrap = %+v, %v; want 3 rewrapped", p, err)
		}
		after, _ := h.store.GetCredential(ctx, "acme", "w1")
		if after.Ciphertext == before.Ciphertext || after.Version != before.Version {
			t.Fatal("rewrap did not replace the ciphertext in place")
		}
		issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w1"})
		if err != nil {
			t.Fatal(err)
		}
		res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
		if err != nil {
			t.Fatal(err)
		}
		logins := h.sim.Stats().WialonLogins
		if _, err := h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: issued.GetHandle(), CredentialGeneration: res.GetCredentialGeneration()}); err != nil {
			t.Fatalf("secret unusable after rewrap: %v", err)
		}
		if h.sim.Stats().WialonLogins != logins+1 {
			t.Fatal("the mint after rewrap did not log in with the stored token")
		}
		// A second run is harmless.
		if p, err := h.svc.Rewrap(ctx, nil); err != nil || p.Rewrapped != 3 {
			t.Fatalf("second rewrap = %+v, %v", p, err)
		}
	})
}

func codeOf(err error) codes.Code {
	st, _ := status.FromError(err)
	return st.Code()
}
