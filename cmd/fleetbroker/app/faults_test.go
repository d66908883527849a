package app_test

// The fault suite: the production builders (BuildCredentials, BuildGateway)
// on real dependencies — a Vault server on file storage that restarts, and
// a redis-server that crashes — with a faulted dependency. Each case
// asserts what callers see (codes, reasons, RetryInfo), how long health
// and calls take to recover after the dependency returns (target ≤ 2 s),
// that every acknowledged write is still there and applied exactly once,
// and that no server stopped. The "reliability:" log lines are the numbers
// in docs/reliability.md (go test -v -run TestFault ./cmd/fleetbroker/app).

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Fault-suite bounds. Health must follow a failing dependency within one
// readiness interval plus one check timeout (the production defaults), and
// a returning one within about a second (failing checks rerun every
// second); calls must work again within recoveryTarget.
const (
	recoveryTarget = 2 * time.Second
	notReadyBound  = server.DefaultReadinessInterval + server.DefaultReadinessTimeout + time.Second
	faultTenant    = "acme"
	// The development API keys of deploy/compose-policy.yaml, which the
	// suite's credentials service loads.
	adminAPIKey   = "compose-admin-dev-key"
	gatewayAPIKey = "compose-gateway-dev-key"
)

// faultStack is the credentials service and a gateway, built as the
// subcommands build them, on a Vault server on file storage (keys
// fleetbroker and fleetbroker-gateway, each service with its own
// least-privilege token from deploy/vault/*.hcl) and a Redis.
type faultStack struct {
	vault      *testenv.VaultFileServer
	credToken  string
	gwToken    string
	redisAddr  string
	prefix     string
	sim        *simulator.Simulator
	simHost    string
	logs       *syncBuffer
	credsAddr  string
	gatewayCfg app.GatewayConfig
	handleKeys *handle.Keys // --handle-key-file, shared by both services
	servers    []*runningServer

	creds      credentialsv1.CredentialServiceClient
	sessions   credentialsv1.SessionServiceClient
	telematics telematicsv1.TelematicsServiceClient
	credsConn  *grpc.ClientConn
	gwConn     *grpc.ClientConn
}

// runningServer is one served server; done is closed when ServeListener
// returned, err is what it returned.
type runningServer struct {
	name     string
	done     chan struct{}
	err      error
	stopping atomic.Bool // set when the test stops it
}

func newFaultStack(t *testing.T, redisAddr string) *faultStack {
	t.Helper()
	return newFaultStackOn(t, app.RedisConfig{Addrs: []string{redisAddr}})
}

// newFaultStackOn is newFaultStack on any Redis topology (Sentinel, say).
func newFaultStackOn(t *testing.T, redisCfg app.RedisConfig) *faultStack {
	t.Helper()
	st := &faultStack{redisAddr: redisCfg.Addrs[0], prefix: testenv.RedisPrefix(t), logs: &syncBuffer{}}
	st.vault = testenv.VaultFile(t)
	st.vault.Init(t)
	st.credToken, st.gwToken = setUpTransit(t, st.vault)

	st.sim = simulator.New(withoutWialonLimits(simulator.Config{Demo: true, Units: 3}))
	simServer := httptest.NewServer(st.sim.Handler())
	t.Cleanup(simServer.Close)
	st.simHost = strings.TrimPrefix(simServer.URL, "http://")
	logger := slog.New(slog.NewJSONHandler(st.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))

	var err error
	if st.handleKeys, err = handle.GenerateKeys(); err != nil {
		t.Fatal(err)
	}
	credCfg := app.CredentialsConfig{
		// Every acknowledged write is checked by logging in with it: more
		// logins a minute than Wialon allows an IP (see withoutWialonLimits).
		WialonLoginLimit:       1_000_000,
		WialonFailedLoginLimit: 1_000_000,
		Server:                 server.Config{GracePeriod: 2 * time.Second},
		Security: app.SecurityConfig{
			Insecure:   true,
			PolicyFile: "../../../deploy/compose-policy.yaml",
			AuditLog:   filepath.Join(t.TempDir(), "audit.log"),
		},
		Vault:            app.VaultConfig{Addr: st.vault.Addr, Token: st.credToken, Key: "fleetbroker"},
		Redis:            redisCfg,
		RedisPrefix:      st.prefix,
		AllowedUpstreams: st.simHost,
		// --redis-wait-replicas' default: one replica where there are any.
		RedisWaitReplicas: app.RedisWaitAuto,
	}
	st.credsAddr = st.serve(t, "credentials", func(ctx context.Context) (*server.Server, func(), error) {
		return asServer(app.BuildCredentials(ctx, credCfg, app.Deps{Logger: logger, HandleKeys: st.handleKeys}))
	})
	st.gatewayCfg = app.GatewayConfig{
		Server:              server.Config{GracePeriod: 2 * time.Second},
		Security:            app.SecurityConfig{Insecure: true},
		CredentialsAddr:     st.credsAddr,
		CredentialsInsecure: true,
		CredentialsAPIKey:   gatewayAPIKey,
		Vault:               app.VaultConfig{Addr: st.vault.Addr, Token: st.gwToken, Key: "fleetbroker-gateway"},
		Redis:               redisCfg,
		RedisPrefix:         st.prefix,
		AllowedUpstreams:    st.simHost,
		FleetUpRate:         100,
	}
	st.credsConn = dialInsecure(t, st.credsAddr)
	st.gwConn = dialInsecure(t, st.newGateway(t))
	st.creds = credentialsv1.NewCredentialServiceClient(st.credsConn)
	st.sessions = credentialsv1.NewSessionServiceClient(st.credsConn)
	st.telematics = telematicsv1.NewTelematicsServiceClient(st.gwConn)
	waitServing(t, st.credsConn)
	waitServing(t, st.gwConn)
	t.Cleanup(func() { st.assertNoCrash(t) })
	return st
}

// newGateway starts another gateway replica (a new process, as far as its
// caches go) and returns its address.
func (st *faultStack) newGateway(t *testing.T) string {
	t.Helper()
	logger := slog.New(slog.NewJSONHandler(st.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	cfg := st.gatewayCfg
	// Each replica writes its own audit file (one writer per file), as
	// each pod has its own volume.
	cfg.Security.AuditLog = filepath.Join(t.TempDir(), "audit.log")
	return st.serve(t, "gateway", func(ctx context.Context) (*server.Server, func(), error) {
		return asServer(app.BuildGateway(ctx, cfg, app.Deps{Logger: logger, HandleKeys: st.handleKeys}))
	})
}

// withoutWialonLimits turns off the simulator's enforcement of Wialon's
// per-session and per-IP limits: the fault suite checks every acknowledged
// write by logging in with it, far more logins a minute than Wialon allows
// one IP, and is about faults, not those limits — which have their own
// tests through the gateway (services/gateway TestFortyHistoryLoadsShare…,
// TestWialonLoginBudgetKeepsTheIPUnblocked).
func withoutWialonLimits(cfg simulator.Config) simulator.Config {
	cfg.WialonSessionRequests, cfg.WialonSessionHeavy = -1, -1
	cfg.WialonLoginsPerMinute, cfg.WialonFailedLoginsPerMinute, cfg.WialonSessionsPerUserIP = -1, -1, -1
	return cfg
}

// setUpTransit creates the two derived keys and a token per service with
// the policy from deploy/vault, as deploy/vault/init.sh does.
func setUpTransit(t *testing.T, vs *testenv.VaultFileServer) (credToken, gwToken string) {
	t.Helper()
	for _, key := range []string{"fleetbroker", "fleetbroker-gateway"} {
		v, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		err = v.EnsureKey(t.Context())
		_ = v.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	root := vaultRoot(t, vs)
	if _, err := root.Logical().Write("transit/config/keys", map[string]any{"disable_upsert": true}); err != nil {
		t.Fatal(err)
	}
	token := func(service string) string {
		rules, err := os.ReadFile("../../../deploy/vault/" + service + ".hcl")
		if err != nil {
			t.Fatal(err)
		}
		if err := root.Sys().PutPolicy("fleetbroker-"+service, string(rules)); err != nil {
			t.Fatal(err)
		}
		s, err := root.Auth().Token().CreateOrphan(&api.TokenCreateRequest{Policies: []string{"fleetbroker-" + service}, Period: "1h"})
		if err != nil {
			t.Fatal(err)
		}
		return s.Auth.ClientToken
	}
	return token("credentials"), token("gateway")
}

func vaultRoot(t *testing.T, vs *testenv.VaultFileServer) *api.Client {
	t.Helper()
	conf := api.DefaultConfig()
	conf.Address = vs.Addr
	c, err := api.NewClient(conf)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(vs.RootToken)
	return c
}

// serve builds and serves a server on a loopback port until the test ends.
func (st *faultStack) serve(t *testing.T, name string, build func(context.Context) (*server.Server, func(), error)) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv, closeAll, err := build(ctx)
	if err != nil {
		cancel()
		t.Fatalf("build %s: %v", name, err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	rs := &runningServer{name: name, done: make(chan struct{})}
	st.servers = append(st.servers, rs)
	go func() { rs.err = srv.ServeListener(ctx, lis); closeAll(); close(rs.done) }()
	t.Cleanup(func() {
		rs.stopping.Store(true)
		cancel()
		select {
		case <-rs.done:
			if rs.err != nil {
				t.Errorf("%s stopped with %v", name, rs.err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not stop", name)
		}
	})
	return lis.Addr().String()
}

// assertNoCrash fails if a server stopped on its own or logged a panic.
func (st *faultStack) assertNoCrash(t *testing.T) {
	t.Helper()
	for _, rs := range st.servers {
		if rs.stopping.Load() {
			continue
		}
		select {
		case <-rs.done:
			t.Errorf("%s stopped during the test: %v", rs.name, rs.err)
		default:
		}
	}
	if strings.Contains(st.logs.String(), "panic") {
		t.Errorf("a server panicked:\n%s", st.logs.String())
	}
}

func dialInsecure(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func asAdmin(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "x-api-key", adminAPIKey)
}

func asGateway(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "x-api-key", gatewayAPIKey)
}

func withHandle(ctx context.Context, handle string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+handle)
}

func waitServing(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := healthpb.NewHealthClient(conn).Check(callCtx(t, 15*time.Second), &healthpb.HealthCheckRequest{})
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not SERVING after 30s: %v, %v", resp.GetStatus(), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// randomToken is a valid, unique Wialon token: 72 alphanumerics.
func randomToken() string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 72)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// putWialon stores a Wialon credential pointing at the simulator.
func (st *faultStack) putWialon(ctx context.Context, id, token string, validate bool) (*credentialsv1.PutCredentialResponse, error) {
	// The simulator learns the token, so a later mint with it succeeds
	// only if the stored secret decrypts to exactly this token.
	st.sim.AddWialonToken(token)
	return st.creds.PutCredential(asAdmin(ctx), &credentialsv1.PutCredentialRequest{
		TenantId: faultTenant, CredentialId: id,
		Secret:         &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: "http://" + st.simHost}},
		SkipValidation: !validate,
	})
}

// openSecret makes the credentials service decrypt the secret behind handle
// and log in with it, as the gateway does (ResolveSession, then
// MintUpstreamSession with the gateway's identity).
func (st *faultStack) openSecret(ctx context.Context, handle string) error {
	res, err := st.sessions.ResolveSession(asGateway(ctx), &credentialsv1.ResolveSessionRequest{Handle: handle})
	if err != nil {
		return err
	}
	_, err = st.sessions.MintUpstreamSession(asGateway(ctx), &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
	return err
}

// issue returns a session handle for a credential.
func (st *faultStack) issue(t *testing.T, id string) string {
	t.Helper()
	resp, err := st.sessions.IssueSession(asAdmin(callCtx(t, 15*time.Second)), &credentialsv1.IssueSessionRequest{
		TenantId: faultTenant, CredentialId: id, Ttl: durationpb.New(time.Hour),
	})
	if err != nil {
		t.Fatalf("IssueSession(%s): %v", id, err)
	}
	return resp.GetHandle()
}

// listUnits is one gateway call for a handle.
func listUnits(ctx context.Context, c telematicsv1.TelematicsServiceClient, handle string) error {
	_, err := c.ListUnits(withHandle(ctx, handle), &telematicsv1.ListUnitsRequest{})
	return err
}

// wantStatus fails unless err is code with ErrorInfo reason and, if
// retry, a RetryInfo.
func wantStatus(t *testing.T, what string, err error, code codes.Code, reason string, retry bool) {
	t.Helper()
	gotRetry := hasRetryInfo(err)
	if status.Code(err) != code || apierr.Reason(err) != reason || gotRetry != retry {
		t.Errorf("%s: %v (reason %q, RetryInfo %v); want %v, reason %q, RetryInfo %v",
			what, err, apierr.Reason(err), gotRetry, code, reason, retry)
	}
}

// since is how long after back event happened; 0 if it happened while the
// dependency was still coming back (before the restore call returned).
func since(event, back time.Time) time.Duration {
	return max(event.Sub(back), 0)
}

func hasRetryInfo(err error) bool {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if _, ok := d.(*errdetails.RetryInfo); ok {
			return true
		}
	}
	return false
}

// healthWatch records the readiness transitions ("" service) a load
// balancer watching the server would see, with when each arrived.
type healthWatch struct {
	mu     sync.Mutex
	events []healthEvent
	cancel context.CancelFunc
}

type healthEvent struct {
	status healthpb.HealthCheckResponse_ServingStatus
	at     time.Time
}

func watchHealth(t *testing.T, conn *grpc.ClientConn) *healthWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &healthWatch{cancel: cancel}
	stream, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			msg, err := stream.Recv()
			if err != nil {
				return
			}
			w.mu.Lock()
			w.events = append(w.events, healthEvent{msg.GetStatus(), time.Now()})
			w.mu.Unlock()
		}
	}()
	t.Cleanup(cancel)
	w.waitStatus(t, healthpb.HealthCheckResponse_SERVING, time.Time{}, 30*time.Second)
	return w
}

// waitStatus waits until the watch has seen want at or after since and
// returns when it arrived.
func (w *healthWatch) waitStatus(t *testing.T, want healthpb.HealthCheckResponse_ServingStatus, since time.Time, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		w.mu.Lock()
		for _, e := range w.events {
			if e.status == want && !e.at.Before(since) {
				w.mu.Unlock()
				return e.at
			}
		}
		w.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("health never reported %v after %s (saw %v)", want, since.Format(time.StampMilli), w.statuses())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// saw reports whether the watch saw status since.
func (w *healthWatch) saw(status healthpb.HealthCheckResponse_ServingStatus, since time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events {
		if e.status == status && !e.at.Before(since) {
			return true
		}
	}
	return false
}

func (w *healthWatch) statuses() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, e := range w.events {
		out = append(out, e.status.String()+"@"+e.at.Format("15:04:05.000"))
	}
	return out
}

// writer puts new credentials, one after another, until stopped, and
// records every answer: the acknowledged writes and the refused ones.
type writer struct {
	st      *faultStack
	mu      sync.Mutex
	results []writeResult
	stop    chan struct{}
	done    chan struct{}
}

type writeResult struct {
	id, token  string
	start, end time.Time
	err        error
}

func startWriter(st *faultStack) *writer {
	w := &writer{st: st, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			r := writeResult{id: fmt.Sprintf("w-%d", i), token: randomToken(), start: time.Now()}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			_, r.err = st.putWialonOnce(ctx, r.id, r.token)
			cancel()
			r.end = time.Now()
			w.mu.Lock()
			w.results = append(w.results, r)
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *writer) finish() []writeResult {
	close(w.stop)
	<-w.done
	return w.results
}

// firstSuccessAfter is how long after t the first write succeeded that
// ended after t.
func (w *writer) firstSuccessAfter(tt *testing.T, t time.Time, timeout time.Duration) time.Duration {
	tt.Helper()
	deadline := time.Now().Add(timeout)
	for {
		w.mu.Lock()
		for _, r := range w.results {
			if r.err == nil && r.end.After(t) {
				w.mu.Unlock()
				return r.end.Sub(t)
			}
		}
		w.mu.Unlock()
		if time.Now().After(deadline) {
			tt.Fatalf("no write succeeded within %s after the dependency returned", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// acked is the number of writes acknowledged so far.
func (w *writer) acked() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, r := range w.results {
		if r.err == nil {
			n++
		}
	}
	return n
}

// waitAcked waits until n writes have been acknowledged.
func (w *writer) waitAcked(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for w.acked() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d writes acknowledged", w.acked(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitFailure waits until a write that started after t has failed, and
// returns its error.
func (w *writer) waitFailure(tt *testing.T, t time.Time) error {
	tt.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		w.mu.Lock()
		for _, r := range w.results {
			if r.err != nil && r.start.After(t) {
				w.mu.Unlock()
				return r.err
			}
		}
		w.mu.Unlock()
		if time.Now().After(deadline) {
			tt.Fatal("no write failed during the fault")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// verifyWrites checks, after recovery, that every acknowledged write is
// stored once (version 1) and decrypts to exactly the secret written; and
// that a refused write either is absent or, if the refusal was only the
// answer lost on the way (Redis died after applying it), is stored once
// and whole. It returns how many writes were acknowledged and refused.
func (st *faultStack) verifyWrites(t *testing.T, results []writeResult, refusedMayExist bool) (acked, refused int) {
	t.Helper()
	ctx := callCtx(t, 15*time.Second)
	for _, r := range results {
		got, err := st.creds.GetCredential(asAdmin(ctx), &credentialsv1.GetCredentialRequest{TenantId: faultTenant, CredentialId: r.id})
		switch {
		case r.err == nil:
			acked++
		case status.Code(err) == codes.NotFound:
			refused++
			continue
		case !refusedMayExist:
			t.Errorf("refused write %s (%v) was stored: %v %v", r.id, r.err, got, err)
			continue
		default:
			refused++
		}
		if err != nil {
			t.Errorf("acknowledged write %s: %v", r.id, err)
			continue
		}
		if v := got.GetCredential().GetVersion(); v != 1 {
			t.Errorf("write %s has version %d, want 1 (applied exactly once)", r.id, v)
		}
		handle := st.issue(t, r.id)
		// The simulator knows every written token and nothing else.
		if err := st.openSecret(ctx, handle); err != nil {
			t.Errorf("write %s does not decrypt to what was written: %v", r.id, err)
		}
	}
	list, err := st.creds.ListCredentials(asAdmin(ctx), &credentialsv1.ListCredentialsRequest{TenantId: faultTenant, PageSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, c := range list.GetCredentials() {
		if seen[c.GetCredentialId()] {
			t.Errorf("credential %s listed twice", c.GetCredentialId())
		}
		seen[c.GetCredentialId()] = true
	}
	return acked, refused
}

// vaultFault is one way Vault stops being usable, and how it comes back.
type vaultFault struct {
	name    string
	inject  func(t *testing.T, vs *testenv.VaultFileServer)
	restore func(t *testing.T, vs *testenv.VaultFileServer)
}

// TestFaultVault: Vault down (stopped, then restarted on its persistent
// storage and unsealed, as docker compose's vault-init does), and Vault
// sealed. Writes fail cleanly with VAULT_UNAVAILABLE and RetryInfo; the
// credentials service reports NOT_SERVING, the gateway stays SERVING and
// keeps serving a warm account; after Vault returns, health and writes
// recover within the target, every acknowledged write is there once and
// decrypts, and the gateway's wrapped data key still unwraps (a new
// replica uses it; it is not replaced).
func TestFaultVault(t *testing.T) {
	faults := []vaultFault{
		{"down and restarted", func(t *testing.T, vs *testenv.VaultFileServer) { vs.Stop(t) },
			func(t *testing.T, vs *testenv.VaultFileServer) { vs.Start(t); vs.Unseal(t) }},
		{"sealed", func(t *testing.T, vs *testenv.VaultFileServer) { vs.Seal(t) },
			func(t *testing.T, vs *testenv.VaultFileServer) { vs.Unseal(t) }},
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			st := newFaultStack(t, testenv.Redis(t).Addr)
			ctx := callCtx(t, 15*time.Second)
			// A warm account: its upstream session is cached, its data key
			// unwrapped in the gateway's memory.
			if _, err := st.putWialon(ctx, "warm", simulator.DemoWialonToken, true); err != nil {
				t.Fatal(err)
			}
			warm := st.issue(t, "warm")
			if err := listUnits(ctx, st.telematics, warm); err != nil {
				t.Fatalf("warm call before the fault: %v", err)
			}
			// A cold account: stored, never used by the gateway.
			if _, err := st.putWialon(ctx, "cold", simulator.DemoWialonToken, false); err != nil {
				t.Fatal(err)
			}
			cold := st.issue(t, "cold")
			rdb := redis.NewClient(&redis.Options{Addr: st.redisAddr})
			defer rdb.Close()
			dkName := st.prefix + ":gw:{" + faultTenant + "}:dk"
			dataKey, err := rdb.Get(ctx, dkName).Result()
			if err != nil {
				t.Fatalf("the gateway's data key is not in Redis: %v", err)
			}

			credHealth, gwHealth := watchHealth(t, st.credsConn), watchHealth(t, st.gwConn)
			w := startWriter(st)
			w.waitAcked(t, 20)

			faultAt := time.Now()
			f.inject(t, st.vault)
			wantStatus(t, "a write while Vault is "+f.name, w.waitFailure(t, faultAt), codes.Unavailable, apierr.ReasonVaultUnavailable, true)
			notReady := credHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, faultAt, 2*notReadyBound).Sub(faultAt)
			if notReady > notReadyBound {
				t.Errorf("credentials reported NOT_SERVING %s after the fault, want ≤ %s", notReady, notReadyBound)
			}
			if err := listUnits(ctx, st.telematics, warm); err != nil {
				t.Errorf("warm gateway call while Vault is %s: %v", f.name, err)
			}
			wantStatus(t, "cold gateway call while Vault is "+f.name, listUnits(ctx, st.telematics, cold), codes.Unavailable, apierr.ReasonVaultUnavailable, true)
			if gwHealth.saw(healthpb.HealthCheckResponse_NOT_SERVING, faultAt) {
				t.Error("the gateway reported NOT_SERVING for a Vault fault; it serves warm accounts without Vault")
			}

			restoring := time.Now()
			f.restore(t, st.vault)
			backAt := time.Now()
			ready := since(credHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, restoring, 30*time.Second), backAt)
			recovered := w.firstSuccessAfter(t, backAt, 30*time.Second)
			w.waitAcked(t, w.acked()+20)
			results := w.finish()
			if ready > recoveryTarget || recovered > recoveryTarget {
				t.Errorf("after Vault returned: SERVING after %s, first write after %s; want both ≤ %s", ready, recovered, recoveryTarget)
			}
			if err := listUnits(ctx, st.telematics, cold); err != nil {
				t.Errorf("cold gateway call after recovery: %v", err)
			}
			// A new gateway replica unwraps the data key made before the
			// fault: nothing was lost, so nothing is replaced.
			fresh := telematicsv1.NewTelematicsServiceClient(dialInsecure(t, st.newGateway(t)))
			if err := listUnits(ctx, fresh, warm); err != nil {
				t.Errorf("new gateway replica after recovery: %v", err)
			}
			if now, err := rdb.Get(ctx, dkName).Result(); err != nil || now != dataKey {
				t.Errorf("the gateway's data key changed across the fault (%v)", err)
			}
			acked, refused := st.verifyWrites(t, results, false)
			t.Logf("reliability: vault %s: writes refused with VAULT_UNAVAILABLE+RetryInfo; credentials NOT_SERVING after %s; SERVING %s and writes %s after Vault returned; %d acknowledged writes all present once, %d refused absent",
				f.name, notReady.Round(10*time.Millisecond), ready.Round(10*time.Millisecond), recovered.Round(10*time.Millisecond), acked, refused)
		})
	}
}

// TestFaultTransitKeyLost: Vault is up and unsealed but its transit keys
// are gone (what a dev-mode Vault restart did to docker compose). Writes
// and readiness say so with a stable reason; once the keys are back (new
// key material, as vault-init creates on an empty Vault), writes and
// readiness recover, credentials stored under the lost key answer
// FAILED_PRECONDITION CREDENTIAL_UNDECRYPTABLE, and the gateway replaces
// its data key that no longer unwraps instead of failing the tenant.
func TestFaultTransitKeyLost(t *testing.T) {
	st := newFaultStack(t, testenv.Redis(t).Addr)
	ctx := callCtx(t, 15*time.Second)
	if _, err := st.putWialon(ctx, "warm", simulator.DemoWialonToken, true); err != nil {
		t.Fatal(err)
	}
	warm := st.issue(t, "warm")
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Fatal(err)
	}
	if _, err := st.putWialon(ctx, "old", randomToken(), false); err != nil {
		t.Fatal(err)
	}
	credHealth, gwHealth := watchHealth(t, st.credsConn), watchHealth(t, st.gwConn)

	root := vaultRoot(t, st.vault)
	lostAt := time.Now()
	for _, key := range []string{"fleetbroker", "fleetbroker-gateway"} {
		if _, err := root.Logical().Write("transit/keys/"+key+"/config", map[string]any{"deletion_allowed": true}); err != nil {
			t.Fatal(err)
		}
		if _, err := root.Logical().Delete("transit/keys/" + key); err != nil {
			t.Fatal(err)
		}
	}
	_, err := st.putWialon(ctx, "during", randomToken(), false)
	wantStatus(t, "a write without the transit key", err, codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, true)
	err = st.openSecret(ctx, st.issue(t, "old"))
	wantStatus(t, "a secret read without the transit key", err, codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, true)
	notReady := credHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, lostAt, 2*notReadyBound).Sub(lostAt)
	if notReady > notReadyBound {
		t.Errorf("credentials reported NOT_SERVING %s after the key was lost, want ≤ %s", notReady, notReadyBound)
	}
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Errorf("warm gateway call without the transit keys: %v", err)
	}
	if gwHealth.saw(healthpb.HealthCheckResponse_NOT_SERVING, lostAt) {
		t.Error("the gateway reported NOT_SERVING; it serves warm accounts without Vault")
	}
	if _, err := st.creds.GetCredential(asAdmin(ctx), &credentialsv1.GetCredentialRequest{TenantId: faultTenant, CredentialId: "during"}); status.Code(err) != codes.NotFound {
		t.Errorf("the refused write was stored: %v", err)
	}

	// The keys come back with new material.
	for _, key := range []string{"fleetbroker", "fleetbroker-gateway"} {
		if _, err := root.Logical().Write("transit/keys/"+key, map[string]any{"derived": true, "type": "aes256-gcm96"}); err != nil {
			t.Fatal(err)
		}
	}
	backAt := time.Now()
	ready := credHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, backAt, 30*time.Second).Sub(backAt)
	if ready > recoveryTarget {
		t.Errorf("credentials SERVING %s after the key returned, want ≤ %s", ready, recoveryTarget)
	}
	if _, err := st.putWialon(ctx, "new", simulator.DemoWialonToken, true); err != nil {
		t.Fatalf("write after the key returned: %v", err)
	}
	err = st.openSecret(ctx, st.issue(t, "old"))
	wantStatus(t, "a secret stored under the lost key", err, codes.FailedPrecondition, apierr.ReasonCredentialUndecryptable, false)

	// A new gateway replica finds a data key in Redis that the new key
	// cannot unwrap: it replaces it and serves the tenant.
	fresh := telematicsv1.NewTelematicsServiceClient(dialInsecure(t, st.newGateway(t)))
	gwBack := time.Now()
	if err := listUnits(ctx, fresh, st.issue(t, "new")); err != nil {
		t.Fatalf("new gateway replica after the key returned: %v", err)
	}
	gwRecovered := time.Since(gwBack)
	if gwRecovered > recoveryTarget {
		t.Errorf("the gateway served the tenant %s after the key returned, want ≤ %s", gwRecovered, recoveryTarget)
	}
	if !strings.Contains(st.logs.String(), "data key no longer unwraps") {
		t.Error("the gateway did not log the data key replacement")
	}
	// The older replica, which still held the lost data key in memory,
	// meets tokens sealed with the new one and follows.
	if err := listUnits(ctx, st.telematics, st.issue(t, "new")); err != nil {
		t.Errorf("the older gateway replica after the replacement: %v", err)
	}
	t.Logf("reliability: transit key lost: writes refused with ENCRYPTION_KEY_UNUSABLE+RetryInfo; credentials NOT_SERVING after %s; SERVING %s after the key returned; old secrets CREDENTIAL_UNDECRYPTABLE; gateway replaced its data key and served in %s",
		notReady.Round(10*time.Millisecond), ready.Round(10*time.Millisecond), gwRecovered.Round(10*time.Millisecond))
}

// TestFaultRedisOutage: Redis crashes (SIGKILL) for five seconds and comes
// back from its AOF. Both services report NOT_SERVING within one readiness
// interval and SERVING within the target once Redis returns; writes fail
// with STORE_UNAVAILABLE and RetryInfo meanwhile, and recover within the
// target; every acknowledged write is there once and decrypts.
func TestFaultRedisOutage(t *testing.T) {
	rs := testenv.RedisRestartable(t)
	st := newFaultStack(t, rs.Addr)
	ctx := callCtx(t, 15*time.Second)
	if _, err := st.putWialon(ctx, "warm", simulator.DemoWialonToken, true); err != nil {
		t.Fatal(err)
	}
	warm := st.issue(t, "warm")
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Fatal(err)
	}
	credHealth, gwHealth := watchHealth(t, st.credsConn), watchHealth(t, st.gwConn)
	w := startWriter(st)
	w.waitAcked(t, 20)

	downAt := time.Now()
	rs.Kill(t)
	wantStatus(t, "a write while Redis is down", w.waitFailure(t, downAt), codes.Unavailable, apierr.ReasonStoreUnavailable, true)
	credDown := credHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, downAt, 2*notReadyBound).Sub(downAt)
	gwDown := gwHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, downAt, 2*notReadyBound).Sub(downAt)
	if credDown > notReadyBound || gwDown > notReadyBound {
		t.Errorf("NOT_SERVING after %s (credentials) and %s (gateway), want ≤ %s", credDown, gwDown, notReadyBound)
	}
	// What a gateway caller sees: UNAVAILABLE with RetryInfo (or, within
	// the resolution cache, an answer).
	if err := listUnits(ctx, st.telematics, warm); err != nil && (status.Code(err) != codes.Unavailable || !hasRetryInfo(err)) {
		t.Errorf("a gateway call while Redis is down: %v (reason %q); want UNAVAILABLE with RetryInfo", err, apierr.Reason(err))
	}
	if outage := time.Since(downAt); outage < 5*time.Second {
		time.Sleep(5*time.Second - outage) // the outage the issue measured: five seconds
	}

	restarting := time.Now()
	rs.Start(t)
	backAt := time.Now()
	credUp := since(credHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, restarting, 30*time.Second), backAt)
	gwUp := since(gwHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, restarting, 30*time.Second), backAt)
	recovered := w.firstSuccessAfter(t, backAt, 30*time.Second)
	w.waitAcked(t, w.acked()+20)
	results := w.finish()
	if credUp > recoveryTarget || gwUp > recoveryTarget || recovered > recoveryTarget {
		t.Errorf("after Redis returned: SERVING after %s (credentials) and %s (gateway), first write after %s; want all ≤ %s",
			credUp, gwUp, recovered, recoveryTarget)
	}
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Errorf("gateway call after recovery: %v", err)
	}
	// A write refused because Redis died after applying it is allowed to
	// exist — once, and whole.
	acked, refused := st.verifyWrites(t, results, true)
	t.Logf("reliability: redis down 5s: writes refused with STORE_UNAVAILABLE+RetryInfo; NOT_SERVING after %s (credentials), %s (gateway); SERVING %s / %s and writes %s after Redis returned; %d acknowledged writes all present once, %d refused",
		credDown.Round(10*time.Millisecond), gwDown.Round(10*time.Millisecond), credUp.Round(10*time.Millisecond), gwUp.Round(10*time.Millisecond),
		recovered.Round(10*time.Millisecond), acked, refused)
}
