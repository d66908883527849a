package bench

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Transit keys of the bench's Vault, as in production: the credentials
// service's secrets key and the gateway's own data-key key.
const (
	credentialsKey = "fleetbroker"
	gatewayKey     = "fleetbroker-gateway"
	storePrefix    = "fbbench"
)

// unlimitedFleetUp is the FleetUp rate budget the bench gives the gateway:
// FleetUp's real guidance (1 request/s per account) would measure the
// limiter, not the gateway. Every request still takes a slot (one Redis
// call), as in production.
const unlimitedFleetUp = 1_000_000

// unlimitedWialonLogins is the credentials service's Wialon login budget in
// the bench: hundreds of distinct credentials are warmed at once, past
// Wialon's 120 logins a minute per IP, which would measure the login guard,
// not the broker. Every login still takes a slot (Redis calls), as in
// production. The simulators enforce no login limit either (newSimConfig).
const unlimitedWialonLogins = 1_000_000

// newSimConfig is a bench simulator: Wialon's per-IP and per-session limits
// off (simulator.Config: negative is no limit). The naive and bare
// baselines do what Wialon forbids — a login per caller, hundreds of
// requests at once on one hand-held session — and would measure 1003s and
// a blocked IP instead of their cost; the gateway keeps within the limits
// by itself (its leases), limits or not.
func newSimConfig(cfg simulator.Config) simulator.Config {
	cfg.WialonSessionRequests, cfg.WialonSessionHeavy = -1, -1
	cfg.WialonLoginsPerMinute, cfg.WialonFailedLoginsPerMinute, cfg.WialonSessionsPerUserIP = -1, -1, -1
	return cfg
}

// env is everything the phases share: Redis, Vault (or the dev keyring),
// the simulators and the credentials service on loopback.
type env struct {
	opts    Options
	log     *slog.Logger // the services' logger
	redis   *Redis
	vault   *Vault
	rdb     redis.UniversalClient
	credTr  transit.Transit
	gwTr    transit.Transit
	allowed string // host:port of every simulator, for the allow-lists
	// handleKeys sign handles at the credentials service and check them at
	// the gateways, as --handle-key-file does for the real binaries.
	handleKeys *handle.Keys
	// handleKeyFile holds them for the real binaries (--handle-key-file).
	handleKeyFile string

	credsAddr string
	credsConn *grpc.ClientConn
	creds     credentialsv1.CredentialServiceClient
	sessions  credentialsv1.SessionServiceClient

	mu       sync.Mutex
	cleanups []func()
	// The production variants' shared set-up (production.go), made on
	// first use, and their credentials services by variant.
	pki           *benchPKI
	prodDir       string
	policyFile    string
	auditSeq      int
	credsVariants map[string]*credsService
	sealTr        *transit.Batching // control phase's opSeal
}

func (e *env) onClose(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, f)
}

// close releases everything, last opened first.
func (e *env) close() {
	e.mu.Lock()
	fs := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// newEnv starts Redis, Vault (unless NoVault) and the credentials
// service. Simulators are started by the phases, before the credentials
// service learns their addresses, so newEnv takes them.
func newEnv(ctx context.Context, opts Options, sims ...*simHTTP) (*env, error) {
	e := &env{opts: opts, log: opts.serviceLogger(), credsVariants: map[string]*credsService{}}
	ok := false
	defer func() {
		if !ok {
			e.close()
		}
	}()
	var err error
	opts.progress("starting redis-server")
	if e.redis, err = StartRedis(); err != nil {
		return nil, err
	}
	e.onClose(e.redis.Stop)
	if e.rdb, err = app.NewRedis(ctx, app.RedisConfig{Addrs: []string{e.redis.Addr}}); err != nil {
		return nil, err
	}
	e.onClose(func() { e.rdb.Close() })

	if opts.NoVault {
		opts.progress("using the dev keyring instead of Vault (-no-vault)")
		if e.credTr, err = transit.NewKeyring(); err != nil {
			return nil, err
		}
		if e.gwTr, err = transit.NewKeyring(); err != nil {
			return nil, err
		}
	} else {
		bin, err := FindVault()
		if err != nil {
			return nil, err
		}
		opts.progress("starting vault server -dev (" + bin + ")")
		if e.vault, err = StartVault(bin); err != nil {
			return nil, err
		}
		e.onClose(e.vault.Stop)
		if e.credTr, err = e.newVaultTransit(ctx, credentialsKey); err != nil {
			return nil, err
		}
		if e.gwTr, err = e.newVaultTransit(ctx, gatewayKey); err != nil {
			return nil, err
		}
	}

	var hosts []string
	for _, s := range sims {
		hosts = append(hosts, s.hostPort)
	}
	e.allowed = strings.Join(hosts, ",")
	if e.handleKeys, e.handleKeyFile, err = newHandleKeyFile(); err != nil {
		return nil, err
	}
	e.onClose(func() { os.RemoveAll(filepath.Dir(e.handleKeyFile)) })
	credSvc, err := app.NewCredentialsService(app.CredentialsConfig{AllowedUpstreams: e.allowed, UpstreamTimeout: 10 * time.Second,
		WialonLoginLimit: unlimitedWialonLogins},
		app.Deps{Logger: e.log, HandleKeys: e.handleKeys, Store: store.NewRedis(e.rdb, store.RedisOptions{Prefix: storePrefix}), Transit: e.credTr})
	if err != nil {
		return nil, err
	}
	if e.credsAddr, err = e.serveGRPC(credSvc.Register, registerNoop); err != nil {
		return nil, err
	}
	conn, err := e.dial(e.credsAddr)
	if err != nil {
		return nil, err
	}
	e.credsConn = conn
	e.creds = credentialsv1.NewCredentialServiceClient(conn)
	e.sessions = credentialsv1.NewSessionServiceClient(conn)
	ok = true
	return e, nil
}

func (e *env) newVaultTransit(ctx context.Context, key string) (*transit.Vault, error) {
	v, err := transit.NewVault(ctx, transit.VaultConfig{Addr: e.vault.Addr, Token: e.vault.Token, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	e.onClose(func() { v.Close() })
	if err := v.EnsureKey(ctx); err != nil {
		return nil, err
	}
	return v, nil
}

// serveGRPC serves services through the project's one server bootstrap
// (its interceptor chain included) on a loopback TCP port.
func (e *env) serveGRPC(register ...func(*grpc.Server)) (string, error) {
	srv, err := server.New(server.Config{Insecure: true, Logger: e.log, GracePeriod: time.Second}, register...)
	if err != nil {
		return "", err
	}
	return e.serveOn(func(ctx context.Context, lis net.Listener) error { return srv.ServeListener(ctx, lis) })
}

// serveOn runs serve on a fresh loopback listener until the env closes.
func (e *env) serveOn(serve func(ctx context.Context, lis net.Listener) error) (string, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = serve(ctx, lis); close(done) }()
	e.onClose(func() { cancel(); <-done })
	return lis.Addr().String(), nil
}

func (e *env) dial(addr string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	e.onClose(func() { conn.Close() })
	return conn, nil
}

// gatewayOpts vary the in-process gateways between phases.
type gatewayOpts struct {
	// prefix separates the token caches of different phases in Redis.
	prefix          string
	jwtSafetyMargin time.Duration
	// idlePerHost > 0 builds the gateway with an upstream transport that
	// keeps this many idle connections per host (the "after" of the
	// connection-churn fix; see tunedTransport).
	idlePerHost int
}

// startGateway runs one gateway replica in this process: its own Redis
// client and credentials-service connection, served on loopback TCP
// through internal/server like the real binary (without caller
// authentication: the handle is the gateway's only caller check).
func (e *env) startGateway(ctx context.Context, o gatewayOpts) (telematicsv1.TelematicsServiceClient, error) {
	rdb, err := app.NewRedis(ctx, app.RedisConfig{Addrs: []string{e.redis.Addr}})
	if err != nil {
		return nil, err
	}
	e.onClose(func() { rdb.Close() })
	credConn, err := e.dial(e.credsAddr)
	if err != nil {
		return nil, err
	}
	cfg := app.GatewayConfig{
		RedisPrefix:      o.prefix,
		AllowedUpstreams: e.allowed,
		HandleCacheTTL:   gateway.DefaultHandleCacheTTL,
		FleetUpRate:      unlimitedFleetUp,
		FleetUpBurst:     unlimitedFleetUp,
		JWTSafetyMargin:  o.jwtSafetyMargin,
		UpstreamTimeout:  10 * time.Second,
	}
	d := app.Deps{Logger: e.log, HandleKeys: e.handleKeys, CredentialsConn: credConn, Redis: rdb, Transit: e.gwTr}
	if o.idlePerHost > 0 {
		if d.UpstreamTransport, err = tunedTransport(e.allowed, o.idlePerHost); err != nil {
			return nil, err
		}
	}
	gw, err := app.NewGatewayService(cfg, d)
	if err != nil {
		return nil, err
	}
	addr, err := e.serveGRPC(gw.Register)
	if err != nil {
		return nil, err
	}
	conn, err := e.dial(addr)
	if err != nil {
		return nil, err
	}
	return telematicsv1.NewTelematicsServiceClient(conn), nil
}

// tunedTransport is the gateway's upstream transport
// (upstream.NewTransport on the allow-list) keeping idlePerHost idle
// connections per host instead of Go's default 2: handed to the gateway
// through app.Deps, it measures that fix from outside the package.
func tunedTransport(allowed string, idlePerHost int) (*http.Transport, error) {
	allow, err := upstream.ParseAllowList(allowed)
	if err != nil {
		return nil, err
	}
	t := upstream.NewTransport(allow)
	t.MaxIdleConnsPerHost = idlePerHost
	t.MaxIdleConns = max(t.MaxIdleConns, 4*idlePerHost)
	return t, nil
}

// account is one upstream account in a simulator and the credential that
// stores it.
type account struct {
	provider string // "wialon" or "fleetup"
	credID   string
	token    string // wialon
	apiKey   string // fleetup
	acctID   int64
	secret   string
}

const (
	provWialon  = "wialon"
	provFleetUp = "fleetup"
)

var providers = []string{provWialon, provFleetUp}

// fleetUpAccountSeq numbers FleetUp accounts: the simulator counts mints
// by account id, so no two accounts may share one.
var fleetUpAccountSeq atomic.Int64

// newAccount makes account i of a phase (tag: 4 letters or digits, unique
// per phase) and registers it with sim.
func newAccount(sim *simulator.Simulator, provider, tag string, i int) account {
	id := fmt.Sprintf("%s-%s-%05d", provider, tag, i)
	switch provider {
	case provWialon:
		tok := fmt.Sprintf("benchWialon%s%08d", tag, i)
		tok += strings.Repeat("0", 72-len(tok))
		sim.AddWialonToken(tok)
		return account{provider: provider, credID: id, token: tok}
	default:
		a := account{provider: provider, credID: id, apiKey: "bench-key-" + tag + "-" + strconv.Itoa(i),
			acctID: fleetUpAccountSeq.Add(1), secret: "bench-secret-" + randomHex(8)}
		sim.AddFleetUpAccount(a.apiKey, a.acctID, a.secret)
		return a
	}
}

// put stores a as a credential of tenant, pointing at baseURL, without
// asking the provider (so the simulator's login counters see only the
// calls being measured).
func (e *env) put(ctx context.Context, tenant string, a account, baseURL string) error {
	return putVia(ctx, e.creds, tenant, a, baseURL)
}

// putRequest is a PutCredentialRequest storing a with skip_validation.
func putRequest(tenant string, a account, baseURL string) *credentialsv1.PutCredentialRequest {
	req := &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: a.credID, SkipValidation: true}
	if a.provider == provWialon {
		req.Secret = &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: a.token, BaseUrl: baseURL}}
	} else {
		req.Secret = &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
			ApiKey: a.apiKey, AccountId: a.acctID, Secret: a.secret, BaseUrl: baseURL}}
	}
	return req
}

// issue returns outgoing metadata carrying a new handle for the credential.
func (e *env) issue(ctx context.Context, tenant, credID string) (metadata.MD, error) {
	resp, err := e.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: tenant, CredentialId: credID, Ttl: durationpb.New(time.Hour)})
	if err != nil {
		return nil, fmt.Errorf("issue session for %s/%s: %w", tenant, credID, err)
	}
	return metadata.Pairs("authorization", "Bearer "+resp.GetHandle()), nil
}

// simHTTP is a simulator served on loopback.
type simHTTP struct {
	sim      *simulator.Simulator
	url      string
	hostPort string
	srv      *http.Server
	// conns counts the TCP connections the simulator accepted: a client
	// that reuses its connections opens few, one that churns opens one per
	// request.
	conns atomic.Int64
}

func startSimulator(cfg simulator.Config) (*simHTTP, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &simHTTP{sim: simulator.New(cfg), hostPort: lis.Addr().String()}
	s.url = "http://" + s.hostPort
	s.srv = &http.Server{Handler: s.sim.Handler(), ReadHeaderTimeout: 5 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				s.conns.Add(1)
			}
		}}
	go func() {
		if err := s.srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			slog.Error("simulator stopped", "error", err)
		}
	}()
	return s, nil
}

func (s *simHTTP) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// upstreamClient is the HTTP client of the direct caller (a) and the bare
// forwarder (b): a keep-alive pool sized for the bench's concurrency, as a
// minimal hand-written forwarder would have. The gateway builds its own
// (internal/upstream.NewTransport).
func upstreamClient(idlePerHost int) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4 * idlePerHost,
		MaxIdleConnsPerHost: idlePerHost,
		IdleConnTimeout:     90 * time.Second,
	}}
}

// newHandleKeyFile makes a handle key and writes it where the real
// binaries read it (--handle-key-file: one base64 key per line).
func newHandleKeyFile() (*handle.Keys, string, error) {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, "", err
	}
	keys, err := handle.NewKeys(secret)
	if err != nil {
		return nil, "", err
	}
	dir, err := os.MkdirTemp("", "fleetbroker-bench-keys-")
	if err != nil {
		return nil, "", err
	}
	path := filepath.Join(dir, "handle-keys")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(secret)+"\n"), 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	return keys, path, nil
}
