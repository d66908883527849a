package credentials_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/providers"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// This file is the harness of the Wialon authorization flow and credential
// event tests: replicas of the credentials service sharing one Redis and
// one transit, each serving gRPC on a loopback port and its callback on
// another, the simulator as Wialon, and a return page standing in for the
// product's. A caller names its principal in metadata (testPrincipalHeader);
// the test authorizer lets every principal do everything except what a
// test denies.

const testPrincipalHeader = "x-test-principal"

// principalAcme is the default caller.
const principalAcme = "spiffe://example.org/ns/acme/sa/api"

// connectBackend is a Redis and a transit the replicas share.
type connectBackend struct {
	name string
	open func(t *testing.T) (redis.UniversalClient, string, transit.Transit)
}

func connectBackends() []connectBackend {
	vault := func(t *testing.T) transit.Transit {
		vs := testenv.Vault(t)
		v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: vs.NewKeyName(t)}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		if err := v.EnsureKey(context.Background()); err != nil {
			t.Fatal(err)
		}
		return v
	}
	return []connectBackend{
		{"redis+vault", func(t *testing.T) (redis.UniversalClient, string, transit.Transit) {
			return testenv.Redis(t).Client(t), testenv.RedisPrefix(t), vault(t)
		}},
		{"redis-cluster+vault", func(t *testing.T) (redis.UniversalClient, string, transit.Transit) {
			return testenv.RedisShardedCluster(t).Client(t), testenv.RedisPrefix(t), vault(t)
		}},
		{"miniredis+keyring", func(t *testing.T) (redis.UniversalClient, string, transit.Transit) {
			mini := miniredis.RunT(t)
			client := redis.NewUniversalClient(&redis.UniversalOptions{Addrs: []string{mini.Addr()}, ContextTimeoutEnabled: true})
			t.Cleanup(func() { client.Close() })
			k, err := transit.NewKeyring()
			if err != nil {
				t.Fatal(err)
			}
			return client, "fb", k
		}},
	}
}

// testClock is a settable clock shared by the replicas.
type testClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *testClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return time.Now().Add(c.off) }
func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off += d
}

// testAuthorizer allows everything but the (principal, tenant) pairs denied.
type testAuthorizer struct {
	mu     sync.Mutex
	denied map[string]bool
}

func (a *testAuthorizer) deny(principal, tenant string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.denied[principal+"|"+tenant] = true
}

func (a *testAuthorizer) Require(ctx context.Context, action policy.Action, tenant string) error {
	p, _ := authn.FromContext(ctx)
	a.mu.Lock()
	defer a.mu.Unlock()
	if p.Name == "" || a.denied[p.Name+"|"+tenant] {
		return apierr.New(codes.PermissionDenied, apierr.ReasonPermissionDenied, "principal "+p.Name+" may not "+string(action)+" for tenant "+tenant, nil)
	}
	return nil
}

func (a *testAuthorizer) GrantableScopes(context.Context, string) []string {
	return []string{policy.ScopeRead, policy.ScopeRaw}
}

// principalFrom names the caller from testPrincipalHeader.
func principalFrom(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	name := principalAcme
	if v := md.Get(testPrincipalHeader); len(v) == 1 {
		name = v[0]
	}
	return authn.NewContext(ctx, authn.Principal{Name: name, Via: authn.ViaURISAN})
}

type principalStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s principalStream) Context() context.Context { return s.ctx }

// connectWorld is what the replicas share.
type connectWorld struct {
	t       *testing.T
	client  redis.UniversalClient
	prefix  string
	transit transit.Transit
	sim     *simulator.Simulator
	simURL  string
	clock   *testClock
	authz   *testAuthorizer
	logs    *testenv.LogBuffer
	audit   *testenv.LogBuffer
	// keys sign the replicas' session handles.
	keys *handle.Keys
	// returns records every request the return page got.
	returnSrv *httptest.Server
	returnsMu sync.Mutex
	returns   []*url.URL
}

// replicaOptions adjust one replica.
type replicaOptions struct {
	returnURLs      string // default: the world's return page
	accessType      string // --wialon-access-type
	allowFullAccess bool
	noConnect       bool
	registerer      prometheus.Registerer
}

// replica is one running credentials service.
type replica struct {
	svc       *credentials.Service
	conn      *grpc.ClientConn
	creds     credentialsv1.CredentialServiceClient
	sessions  credentialsv1.SessionServiceClient
	publicURL string
	events    *credentials.Events
}

func newConnectWorld(t *testing.T, be connectBackend) *connectWorld {
	t.Helper()
	client, prefix, tr := be.open(t)
	keys, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	w := &connectWorld{t: t, client: client, prefix: prefix, transit: tr, clock: &testClock{},
		authz: &testAuthorizer{denied: map[string]bool{}}, logs: &testenv.LogBuffer{}, audit: &testenv.LogBuffer{}, keys: keys}
	w.sim = simulator.New(simulator.Config{Units: 3})
	w.sim.AddWialonToken(canaryToken)
	simSrv := httptest.NewServer(w.sim.Handler())
	t.Cleanup(simSrv.Close)
	w.simURL = simSrv.URL
	w.returnSrv = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.returnsMu.Lock()
		w.returns = append(w.returns, r.URL)
		w.returnsMu.Unlock()
		if r.Header.Get("Referer") != "" {
			t.Errorf("the return page got a Referer header")
		}
		_, _ = rw.Write([]byte("product page"))
	}))
	t.Cleanup(w.returnSrv.Close)
	return w
}

func (w *connectWorld) returnURL() string { return w.returnSrv.URL + "/settings/wialon" }

// start runs a replica until the test ends.
func (w *connectWorld) start(opts replicaOptions) *replica {
	t := w.t
	t.Helper()
	logger := slog.New(slog.NewJSONHandler(w.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	allow, err := upstream.ParseAllowList(strings.TrimPrefix(w.simURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	events, err := credentials.NewEvents(credentials.EventsConfig{Client: w.client, Prefix: w.prefix, PollInterval: time.Minute,
		ExpiryWarning: 14 * 24 * time.Hour, CheckInterval: time.Hour, Registerer: opts.registerer, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	callbackLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	publicURL := "http://" + callbackLis.Addr().String()
	cfg := credentials.Config{
		Store: store.NewRedis(w.client, store.RedisOptions{Prefix: w.prefix}), Transit: w.transit,
		Providers: w.providers(allow), HandleKeys: w.keys, Authorizer: w.authz, AllowList: allow,
		Logger: logger, Now: w.clock.Now, Events: events,
	}
	if !opts.noConnect {
		returnURLs := opts.returnURLs
		if returnURLs == "" {
			returnURLs = w.returnSrv.URL + "/settings"
		}
		list, err := credentials.ParseReturnURLs(returnURLs)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Connect = &credentials.ConnectConfig{Client: w.client, Prefix: w.prefix, PublicURL: publicURL, ClientID: "acme-fleet",
			AccessType: opts.accessType, AllowFullAccess: opts.allowFullAccess, ReturnURLs: list,
			Audit: audit.New(w.audit), Registerer: opts.registerer}
	}
	svc, err := credentials.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{Logger: logger, Insecure: true,
		Unary: []grpc.UnaryServerInterceptor{func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			return h(principalFrom(ctx), req)
		}},
		Stream: []grpc.StreamServerInterceptor{func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, principalStream{ss, principalFrom(ss.Context())})
		}},
	}, svc.Register)
	if err != nil {
		t.Fatal(err)
	}
	grpcLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.ServeListener(ctx, grpcLis) })
	wg.Go(func() { _ = events.Run(ctx) })
	if h := svc.AuthorizeHandler(); h != nil {
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		wg.Go(func() { _ = hs.Serve(callbackLis) })
		wg.Go(func() { <-ctx.Done(); _ = hs.Close() })
	} else {
		callbackLis.Close()
	}
	t.Cleanup(func() { cancel(); wg.Wait() })
	waitCtx, waitCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer waitCancel()
	if err := events.Subscribed(waitCtx); err != nil {
		t.Fatalf("event notifications not subscribed: %v", err)
	}
	conn, err := grpc.NewClient(grpcLis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &replica{svc: svc, conn: conn, creds: credentialsv1.NewCredentialServiceClient(conn),
		sessions: credentialsv1.NewSessionServiceClient(conn), publicURL: publicURL, events: events}
}

// serviceConfig is a minimal service configuration with connect (tests of
// the configuration checks).
func (w *connectWorld) serviceConfig(connect *credentials.ConnectConfig) credentials.Config {
	allow, err := upstream.ParseAllowList("")
	if err != nil {
		w.t.Fatal(err)
	}
	return credentials.Config{Store: store.NewRedis(w.client, store.RedisOptions{Prefix: w.prefix}), Transit: w.transit,
		Providers: w.providers(allow), HandleKeys: w.keys, Authorizer: w.authz, Connect: connect}
}

// providers is the production provider registry, its upstream calls
// guarded by allow, sharing the world's Redis as every replica of the
// credentials service does (the Wialon login budget and refused tokens).
func (w *connectWorld) providers(allow *upstream.AllowList) *provider.Registry {
	w.t.Helper()
	transport := upstream.NewTransport(allow)
	reg, err := provider.NewRegistry(provider.Env{HTTPClient: func(string) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: transport}
	}, Redis: w.client, RedisPrefix: w.prefix}, providers.All()...)
	if err != nil {
		w.t.Fatal(err)
	}
	return reg
}

// as returns a context calling as principal.
func as(principal string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), testPrincipalHeader, principal)
}

// noRedirects is a browser that stops at every redirect, so the test sees
// each hop.
var noRedirects = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// hop is one browser request and its answer.
type hop struct {
	status   int
	location string
	header   http.Header
	body     string
}

func get(t *testing.T, u string) hop {
	t.Helper()
	resp, err := noRedirects.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return hop{status: resp.StatusCode, location: resp.Header.Get("Location"), header: resp.Header, body: b.String()}
}

// approveAtWialon plays the customer on the simulator's login.html: it
// opens the authorize URL, checks the form, presses the button and
// returns the URL Wialon redirects the browser to (the broker's callback).
func approveAtWialon(t *testing.T, authorizeURL, action string, tamper func(url.Values)) string {
	t.Helper()
	page := get(t, authorizeURL)
	if page.status != http.StatusOK || !strings.Contains(page.body, `<form method="post"`) {
		t.Fatalf("login.html: %d %s", page.status, page.body)
	}
	u, err := url.Parse(authorizeURL)
	if err != nil {
		t.Fatal(err)
	}
	form := u.Query()
	if tamper != nil {
		tamper(form)
	}
	form.Set("action", action)
	form.Set("login", "fleet_manager")
	resp, err := noRedirects.PostForm(u.Scheme+"://"+u.Host+"/login.html", form)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("login.html POST: %d", resp.StatusCode)
	}
	return resp.Header.Get("Location")
}

// dump renders every key of the world's prefix and its value, streams
// included, to prove no plaintext is stored.
func (w *connectWorld) dump() string {
	t := w.t
	t.Helper()
	ctx := context.Background()
	var b strings.Builder
	scan := func(c redis.Cmdable) {
		iter := c.Scan(ctx, 0, w.prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			k := iter.Val()
			b.WriteString(k + "\n")
			switch w.client.Type(ctx, k).Val() {
			case "string":
				b.WriteString(w.client.Get(ctx, k).Val())
			case "hash":
				fmt.Fprint(&b, w.client.HGetAll(ctx, k).Val())
			case "zset":
				fmt.Fprint(&b, w.client.ZRange(ctx, k, 0, -1).Val())
			case "stream":
				fmt.Fprint(&b, w.client.XRange(ctx, k, "-", "+").Val())
			}
			b.WriteString("\n")
		}
		if err := iter.Err(); err != nil {
			t.Fatal(err)
		}
	}
	if cc, ok := w.client.(*redis.ClusterClient); ok {
		var mu sync.Mutex
		if err := cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			mu.Lock()
			defer mu.Unlock()
			scan(c)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	} else {
		scan(w.client)
	}
	return b.String()
}

// assertNoLeak fails if secret is in the logs, the audit trail, Redis, the
// URLs the return page got, or the metrics of reg.
func (w *connectWorld) assertNoLeak(t *testing.T, reg *prometheus.Registry, secrets ...string) {
	t.Helper()
	places := map[string]string{"logs": w.logs.String(), "audit trail": w.audit.String(), "redis": w.dump()}
	w.returnsMu.Lock()
	for _, u := range w.returns {
		places["return URLs"] += u.String() + "\n"
	}
	w.returnsMu.Unlock()
	if reg != nil {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		places["metrics"] = fmt.Sprint(mfs)
	}
	for _, s := range secrets {
		if len(s) < 16 {
			t.Fatalf("assertNoLeak: %q is too short to be a planted secret", s)
		}
		for where, text := range places {
			if strings.Contains(text, s) {
				t.Errorf("a secret (%.6s…) is in the %s", s, where)
			}
		}
	}
}
