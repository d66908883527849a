package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

// Security levels: how much of production's caller security a service runs
// with. Each adds one piece to the level before it, so the difference
// between neighbours is that piece's cost.
const (
	// lvlPlain is plaintext gRPC without caller authentication: every
	// variant measured before the production variants.
	lvlPlain = "plain"
	// lvlTLS adds mTLS (TLS 1.3, client certificates) on every hop:
	// caller → gateway → credentials service, caller → credentials service.
	lvlTLS = "tls"
	// lvlPolicy adds the authorizer (app.Build*): the caller's identity
	// from its certificate, the method's rule, the policy grant; audit
	// records are made and discarded.
	lvlPolicy = "policy"
	// lvlLimits adds the rate budgets per principal, session and tenant
	// (Redis, leased), set above any load the bench makes.
	lvlLimits = "limits"
	// lvlProduction adds the audit trail on a file: an intent record
	// synced before each call runs, an outcome record after. It is
	// app.BuildCredentials / app.BuildGateway as `fleetbroker credentials`
	// and `fleetbroker gateway` run them.
	lvlProduction = "production"
)

// securityLevels are the levels above plain, in the order they add up.
var securityLevels = []string{lvlTLS, lvlPolicy, lvlLimits, lvlProduction}

// Principals of the bench's policy.
const (
	callerPrincipal  = "spiffe://fleetbroker-bench/ns/bench/sa/caller"
	gatewayPrincipal = "spiffe://fleetbroker-bench/ns/fleetbroker/sa/gateway"
)

// benchPolicy lets the caller manage credentials and sessions of every
// tenant, and the gateway resolve sessions.
const benchPolicy = `grants:
  - principals: ["` + callerPrincipal + `"]
    tenants: ["*"]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
    scopes: [read, raw]
  - principals: ["` + gatewayPrincipal + `"]
    tenants: ["*"]
    actions: [sessions.resolve]
`

// benchRateLimit is every rate budget (requests/s per principal, session
// and tenant) from the limits level on: above any load the bench makes, so
// the budgets are paid for (a leased Redis script each) but never refuse,
// as with FleetUp's budget (unlimitedFleetUp).
const benchRateLimit = 1_000_000

// Credentials-service variants of the control phase: the security levels,
// and transit batching off or on.
const (
	credPlainBatch        = "plain+batch"
	credProductionNoBatch = "production-nobatch"
)

// credsVariant is one way of running the credentials service.
type credsVariant struct {
	name  string
	level string
	batch bool // transit batching (Options.TransitBatch) on
}

// credsVariants are every credentials-service variant, in the order a
// round runs them. Up to production-nobatch transit batching is off, so
// neighbours differ by one security piece; production is production-nobatch
// with batching, i.e. what `fleetbroker credentials` runs by default.
var credsVariants = []credsVariant{
	{lvlPlain, lvlPlain, false},
	{credPlainBatch, lvlPlain, true},
	{lvlTLS, lvlTLS, false},
	{lvlPolicy, lvlPolicy, false},
	{lvlLimits, lvlLimits, false},
	{credProductionNoBatch, lvlProduction, false},
	{lvlProduction, lvlProduction, true},
}

// credsService is a credentials service variant and its clients: as the
// bench's caller, and as the gateway (ResolveSession).
type credsService struct {
	addr     string
	conn     grpc.ClientConnInterface // as the bench's caller
	creds    credentialsv1.CredentialServiceClient
	sessions credentialsv1.SessionServiceClient
	resolver credentialsv1.SessionServiceClient
	// batches counts the transit calls and items of plain+batch, the one
	// variant whose transit the bench builds itself.
	batches *batchCounter
	// audit is the production variants' audit trail (nil below).
	audit *audit.Logger
}

// needsBuilders reports whether a level is built by app.Build*, which
// needs Vault.
func needsBuilders(level string) bool { return level != lvlPlain && level != lvlTLS }

// production sets up what the production variants share, once: the
// certificates, the policy file and the audit directory.
func (e *env) production() (*benchPKI, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pki != nil {
		return e.pki, nil
	}
	dir, err := os.MkdirTemp(e.opts.AuditDir, "fleetbroker-bench-")
	if err != nil {
		return nil, err
	}
	e.cleanups = append(e.cleanups, func() { os.RemoveAll(dir) })
	e.prodDir = dir
	pki, err := newPKI(dir)
	if err != nil {
		return nil, err
	}
	e.policyFile = filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(e.policyFile, []byte(benchPolicy), 0o600); err != nil {
		return nil, err
	}
	e.pki = pki
	return pki, nil
}

// auditFile names a new audit file: one per service (each holds a lock on
// its own), on the disk of Options.AuditDir, so every record's fsync is a
// real one.
func (e *env) auditFile(name string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.auditSeq++
	return filepath.Join(e.prodDir, fmt.Sprintf("audit-%s-%d.jsonl", strings.ReplaceAll(name, "/", "-"), e.auditSeq))
}

// security is the SecurityConfig of a service built by app.Build* at level
// (policy, limits or production), with the server certificate given, and
// the Deps it is built with: below production, an audit trail that
// discards (measuring what the trail costs).
//
// At the production level the bench opens the audit file itself, exactly
// as --audit-log would (audit.Open), so that it can read the trail's sync
// statistics; it closes the file after the service has stopped.
func (e *env) security(level, name, certFile, keyFile string) (app.SecurityConfig, app.Deps, error) {
	sec := app.SecurityConfig{TLSCert: certFile, TLSKey: keyFile, TLSClientCA: e.pki.caFile, PolicyFile: e.policyFile}
	d := app.Deps{Logger: e.log, HandleKeys: e.handleKeys}
	switch level {
	case lvlPolicy:
		d.Audit = audit.Discard()
	case lvlLimits:
		d.Audit = audit.Discard()
		sec.RateLimitPrincipal, sec.RateLimitSession, sec.RateLimitTenant = benchRateLimit, benchRateLimit, benchRateLimit
	case lvlProduction:
		l, err := audit.Open(e.auditFile(name), audit.WithErrorLog(e.log))
		if err != nil {
			return sec, d, err
		}
		e.onClose(func() { _ = l.Close() })
		d.Audit = l
		sec.RateLimitPrincipal, sec.RateLimitSession, sec.RateLimitTenant = benchRateLimit, benchRateLimit, benchRateLimit
	}
	return sec, d, nil
}

// credentialsVariant returns the credentials service of v, starting it on
// first use. Every variant shares the store (Redis prefix) and the transit
// key, so credentials and handles made through one work in all.
func (e *env) credentialsVariant(ctx context.Context, v credsVariant) (*credsService, error) {
	e.mu.Lock()
	s, ok := e.credsVariants[v.name]
	e.mu.Unlock()
	if ok {
		return s, nil
	}
	s, err := e.startCredentials(ctx, v)
	if err != nil {
		return nil, fmt.Errorf("credentials service %s: %w", v.name, err)
	}
	e.mu.Lock()
	e.credsVariants[v.name] = s
	e.mu.Unlock()
	return s, nil
}

func (e *env) startCredentials(ctx context.Context, v credsVariant) (*credsService, error) {
	if v.name == lvlPlain {
		return &credsService{addr: e.credsAddr, conn: e.credsConn, creds: e.creds, sessions: e.sessions, resolver: e.sessions}, nil
	}
	cfg := app.CredentialsConfig{AllowedUpstreams: e.allowed, UpstreamTimeout: 10 * time.Second, RedisPrefix: storePrefix,
		WialonLoginLimit: unlimitedWialonLogins}
	inProcess := app.Deps{Logger: e.log, HandleKeys: e.handleKeys, Store: store.NewRedis(e.rdb, store.RedisOptions{Prefix: storePrefix}), Transit: e.credTr}
	s := &credsService{}
	switch v.level {
	case lvlPlain: // plain+batch (plain itself is the env's own service)
		s.batches = &batchCounter{}
		opts := e.opts.TransitBatch
		opts.OnBatch = s.batches.add
		inProcess.Transit = transit.NewBatching(e.credTr.(transit.BatchingBackend), opts)
		svc, err := app.NewCredentialsService(cfg, inProcess)
		if err != nil {
			return nil, err
		}
		if s.addr, err = e.serveGRPC(svc.Register, registerNoop); err != nil {
			return nil, err
		}
	case lvlTLS:
		pki, err := e.production()
		if err != nil {
			return nil, err
		}
		svc, err := app.NewCredentialsService(cfg, inProcess)
		if err != nil {
			return nil, err
		}
		if s.addr, err = e.serveTLS(pki.credsCert, pki.credsKey, svc.Register, registerNoop); err != nil {
			return nil, err
		}
	default:
		if e.vault == nil {
			return nil, fmt.Errorf("the %s level is built by app.BuildCredentials, which needs Vault (not -no-vault)", v.level)
		}
		pki, err := e.production()
		if err != nil {
			return nil, err
		}
		sec, d, err := e.security(v.level, "credentials-"+v.name, pki.credsCert, pki.credsKey)
		if err != nil {
			return nil, err
		}
		cfg.Security = sec
		if v.level == lvlProduction {
			s.audit = d.Audit
		}
		cfg.Vault = app.VaultConfig{Addr: e.vault.Addr, Token: e.vault.Token, Key: credentialsKey}
		cfg.Redis = app.RedisConfig{Addrs: []string{e.redis.Addr}}
		d.BesideRegister, d.BesideActions = registerNoop, map[string]policy.Action{noopMethod: noopAction}
		cfg.TransitBatch = transit.BatchOptions{MaxItems: 1}
		if v.batch {
			cfg.TransitBatch = e.opts.TransitBatch
		}
		if s.addr, err = e.serveBuilt(ctx, func(ctx context.Context) (*server.Server, func(), error) {
			return asServer(app.BuildCredentials(ctx, cfg, d))
		}); err != nil {
			return nil, err
		}
	}
	caller, err := e.dialAs(s.addr, v.level, false)
	if err != nil {
		return nil, err
	}
	gw, err := e.dialAs(s.addr, v.level, true)
	if err != nil {
		return nil, err
	}
	s.conn = caller
	s.creds = credentialsv1.NewCredentialServiceClient(caller)
	s.sessions = credentialsv1.NewSessionServiceClient(caller)
	s.resolver = credentialsv1.NewSessionServiceClient(gw)
	return s, nil
}

// dialAs connects to a service of level as the bench's caller (or, with
// asGateway, as the gateway): plaintext at the plain level, else mTLS with
// that identity's certificate.
func (e *env) dialAs(addr, level string, asGateway bool) (*grpc.ClientConn, error) {
	if level == lvlPlain {
		return e.dial(addr)
	}
	pki, err := e.production()
	if err != nil {
		return nil, err
	}
	cfg := pki.callerTLS
	if asGateway {
		cfg = pki.gatewayTLS
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg.Clone())))
	if err != nil {
		return nil, err
	}
	e.onClose(func() { conn.Close() })
	return conn, nil
}

// serveTLS serves services like serveGRPC, over mTLS with the given server
// certificate (the tls level: no authorizer).
func (e *env) serveTLS(certFile, keyFile string, register ...func(*grpc.Server)) (string, error) {
	reloader, tlsCfg, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: certFile, KeyFile: keyFile, CAFile: e.pki.caFile}, e.log)
	if err != nil {
		return "", err
	}
	e.onClose(func() { _ = reloader.Close() })
	srv, err := server.New(server.Config{TLS: tlsCfg, Logger: e.log, GracePeriod: time.Second}, register...)
	if err != nil {
		return "", err
	}
	return e.serveOn(func(ctx context.Context, lis net.Listener) error { return srv.ServeListener(ctx, lis) })
}

// asServer is what an app.Build* function returned, as serveBuilt takes it.
func asServer(b *app.Built, err error) (*server.Server, func(), error) {
	if err != nil {
		return nil, nil, err
	}
	return b.GRPC, b.Close, nil
}

// serveBuilt serves a server made by an app.Build* function on loopback,
// and releases what it opened after it stops.
func (e *env) serveBuilt(ctx context.Context, build func(context.Context) (*server.Server, func(), error)) (string, error) {
	srv, closeAll, err := build(ctx)
	if err != nil {
		return "", err
	}
	return e.serveOn(func(ctx context.Context, lis net.Listener) error {
		defer closeAll()
		return srv.ServeListener(ctx, lis)
	})
}

// startGatewayAt runs a gateway replica at level, in front of the
// credentials service of that level, and returns a client of it as the
// bench's caller.
func (e *env) startGatewayAt(ctx context.Context, level string, o gatewayOpts) (telematicsv1.TelematicsServiceClient, error) {
	if level == lvlPlain {
		return e.startGateway(ctx, o)
	}
	pki, err := e.production()
	if err != nil {
		return nil, err
	}
	creds, err := e.credentialsVariant(ctx, credsVariantNamed(level))
	if err != nil {
		return nil, err
	}
	cfg := app.GatewayConfig{
		CredentialsAddr:       creds.addr,
		CredentialsTLS:        tlsutil.Files{CAFile: pki.caFile, CertFile: pki.gwCert, KeyFile: pki.gwKey},
		CredentialsServerName: "localhost",
		RedisPrefix:           o.prefix,
		AllowedUpstreams:      e.allowed,
		HandleCacheTTL:        gateway.DefaultHandleCacheTTL,
		FleetUpRate:           unlimitedFleetUp,
		FleetUpBurst:          unlimitedFleetUp,
		JWTSafetyMargin:       o.jwtSafetyMargin,
		UpstreamTimeout:       10 * time.Second,
	}
	var addr string
	if level == lvlTLS {
		conn, err := e.dialAs(creds.addr, lvlTLS, true)
		if err != nil {
			return nil, err
		}
		rdb, err := app.NewRedis(ctx, app.RedisConfig{Addrs: []string{e.redis.Addr}})
		if err != nil {
			return nil, err
		}
		e.onClose(func() { rdb.Close() })
		gw, err := app.NewGatewayService(cfg, app.Deps{Logger: e.log, HandleKeys: e.handleKeys, CredentialsConn: conn, Redis: rdb, Transit: e.gwTr})
		if err != nil {
			return nil, err
		}
		if addr, err = e.serveTLS(pki.gwCert, pki.gwKey, gw.Register); err != nil {
			return nil, err
		}
	} else {
		if e.vault == nil {
			return nil, fmt.Errorf("the %s level is built by app.BuildGateway, which needs Vault (not -no-vault)", level)
		}
		sec, d, err := e.security(level, "gateway-"+o.prefix, pki.gwCert, pki.gwKey)
		if err != nil {
			return nil, err
		}
		cfg.Security = sec
		cfg.Vault = app.VaultConfig{Addr: e.vault.Addr, Token: e.vault.Token, Key: gatewayKey}
		cfg.Redis = app.RedisConfig{Addrs: []string{e.redis.Addr}}
		if addr, err = e.serveBuilt(ctx, func(ctx context.Context) (*server.Server, func(), error) {
			return asServer(app.BuildGateway(ctx, cfg, d))
		}); err != nil {
			return nil, err
		}
	}
	conn, err := e.dialAs(addr, level, false)
	if err != nil {
		return nil, err
	}
	return telematicsv1.NewTelematicsServiceClient(conn), nil
}

// credsVariantNamed returns the credentials variant called name.
func credsVariantNamed(name string) credsVariant {
	for _, v := range credsVariants {
		if v.name == name {
			return v
		}
	}
	panic("bench: no credentials variant " + name)
}

// batchCounter counts the backend calls and items of a transit.Batching.
type batchCounter struct {
	mu           sync.Mutex
	calls, items int64
}

func (b *batchCounter) add(_ string, items int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	b.items += int64(items)
}

func (b *batchCounter) load() (calls, items int64) {
	if b == nil {
		return 0, 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls, b.items
}
