// Package security_test is the attacker's view of fleetbroker: the
// credentials service and the gateway started the way production runs them
// (mTLS with certificates from a test CA, a policy file, an audit file, real
// Redis and Vault, the simulator as the upstream), called with every
// identity an attacker can bring. Every refused call must be refused,
// audited, and leak nothing.
//
// The harness in this file is shared: put new attack cases in their own
// files, start a Stack with Start, dial with Stack.Dial as an Identity, and
// finish with Stack.AssertNoLeak for the secrets the case planted.
package security_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// Principals of the default policy.
const (
	PrincipalAcme    = "spiffe://example.org/ns/acme/sa/api"
	PrincipalGlobex  = "spiffe://example.org/ns/globex/sa/api"
	PrincipalGateway = "spiffe://example.org/ns/fleetbroker/sa/gateway"
	// KeyBillingBatch is the API key of principal key:billing-batch.
	KeyBillingBatch = "billing-batch-api-key-canary-7f3e9a"
	// DNSReporting is a workload named by its DNS SAN.
	DNSReporting = "reporting.acme.svc"
	// CNLegacy is a workload with a CN-only certificate.
	CNLegacy = "legacy-client"

	TenantAcme   = "acme"
	TenantGlobex = "globex"
)

// Credentials seeded by Start: a Wialon and a FleetUp credential for acme
// (the simulator's demo accounts), a Wialon one for globex.
const (
	CredWialon  = "wialon-main"
	CredFleetUp = "fleetup-main"
)

// DefaultPolicy grants acme's workload everything on acme (raw sessions
// too), globex's on globex, the batch key reads and sessions on acme, the
// reporting workload (DNS SAN) and the legacy one (CN) reads on acme, and
// the gateway resolution on every tenant.
var DefaultPolicy = `api_keys:
  - principal: key:billing-batch
    sha256: "` + sha256Hex(KeyBillingBatch) + `"
grants:
  - principals: ["` + PrincipalAcme + `"]
    tenants: [acme]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
    scopes: [read, raw]
  - principals: ["` + PrincipalGlobex + `"]
    tenants: [globex]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
  - principals: ["key:billing-batch"]
    tenants: [acme]
    actions: [credentials.read, sessions.issue]
  - principals: ["dns:` + DNSReporting + `", "cn:` + CNLegacy + `"]
    tenants: [acme]
    actions: [credentials.read]
  - principals: ["` + PrincipalGateway + `"]
    tenants: ["*"]
    actions: [sessions.resolve]
`

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// Options shape a Stack; the zero value is production as the manifests
// run it: strict mTLS on both services, audit files, the default policy.
type Options struct {
	// Policy replaces DefaultPolicy.
	Policy string
	// AuditDir holds the audit files (default: a temporary directory).
	AuditDir string
	// Credentials and Gateway adjust the configurations before the
	// services are built.
	Credentials func(*app.CredentialsConfig)
	Gateway     func(*app.GatewayConfig)
	// CredentialsDeps adjusts the parts the credentials service is built
	// with (a listener, metrics).
	CredentialsDeps func(*app.Deps)
	// GatewayDeps adjusts the parts the gateway is built with (providers).
	GatewayDeps func(*app.Deps)
	// NoSeed skips storing the seeded credentials.
	NoSeed bool
}

// Stack is a running credentials service and gateway.
type Stack struct {
	PKI                    *testenv.PKI
	CredsAddr, GatewayAddr string
	// Credentials and Gateway are the built servers (their services and
	// methods: GRPC().GetServiceInfo()).
	Credentials, Gateway *server.Server
	PolicyFile           string
	// CredsAudit and GatewayAudit are the audit files.
	CredsAudit, GatewayAudit string
	// Logs is everything both services logged.
	Logs   *testenv.LogBuffer
	Sim    *simulator.Simulator
	SimURL string
	Redis  redis.UniversalClient
	Prefix string
}

// Start runs the credentials service and the gateway with real Redis,
// Vault and the simulator, and seeds the credentials above through the
// public API.
func Start(t *testing.T, opts Options) *Stack {
	t.Helper()
	s := &Stack{PKI: testenv.NewPKI(t), Logs: &testenv.LogBuffer{}}
	dir := t.TempDir()
	auditDir := opts.AuditDir
	if auditDir == "" {
		auditDir = dir
	}
	s.PolicyFile = filepath.Join(dir, "policy.yaml")
	s.CredsAudit = filepath.Join(auditDir, "credentials-audit.jsonl")
	s.GatewayAudit = filepath.Join(auditDir, "gateway-audit.jsonl")
	pol := opts.Policy
	if pol == "" {
		pol = DefaultPolicy
	}
	if err := os.WriteFile(s.PolicyFile, []byte(pol), 0o600); err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewJSONHandler(s.Logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	s.Sim = simulator.New(simulator.Config{Demo: true})
	sim := httptest.NewServer(s.Sim.Handler())
	t.Cleanup(sim.Close)
	s.SimURL = sim.URL
	simHost := strings.TrimPrefix(sim.URL, "http://")

	rs := testenv.Redis(t)
	s.Redis = rs.Client(t)
	s.Prefix = testenv.RedisPrefix(t)
	vs := testenv.Vault(t)
	credKey, gwKey := vs.NewKeyName(t), vs.NewKeyName(t)
	for _, key := range []string{credKey, gwKey} {
		v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: key}, logger)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.EnsureKey(context.Background()); err != nil {
			t.Fatal(err)
		}
		v.Close()
	}
	loopback := testenv.IssueOptions{DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}
	credCert, credKeyFile := s.PKI.Issue(t, "credentials", loopback)
	gwOpts := loopback
	gwOpts.URIs = []string{PrincipalGateway}
	gwCert, gwKeyFile := s.PKI.Issue(t, "gateway", gwOpts)

	handleKeys, err := handle.GenerateKeys() // --handle-key-file, shared by both services
	if err != nil {
		t.Fatal(err)
	}
	credCfg := app.CredentialsConfig{
		Server: server.Config{Reflection: true},
		Security: app.SecurityConfig{
			TLSCert: credCert, TLSKey: credKeyFile, TLSClientCA: s.PKI.CAFile(),
			PolicyFile: s.PolicyFile, AuditLog: s.CredsAudit,
		},
		Vault:            app.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: credKey},
		Redis:            app.RedisConfig{Addrs: []string{rs.Addr}},
		RedisPrefix:      s.Prefix,
		AllowedUpstreams: simHost,
	}
	if opts.Credentials != nil {
		opts.Credentials(&credCfg)
	}
	credDeps := app.Deps{Logger: logger, HandleKeys: handleKeys}
	if opts.CredentialsDeps != nil {
		opts.CredentialsDeps(&credDeps)
	}
	s.Credentials, s.CredsAddr = serve(t, func(ctx context.Context) (*server.Server, func(), error) {
		built, err := app.BuildCredentials(ctx, credCfg, credDeps)
		if err != nil {
			return nil, nil, err
		}
		// The authorization callback (when configured) and the background
		// work run beside the gRPC port until the test ends.
		beside := make(chan struct{})
		go func() { defer close(beside); _ = built.ServeBeside(ctx) }()
		return built.GRPC, func() { <-beside; built.Close() }, nil
	})
	gwCfg := app.GatewayConfig{
		Server: server.Config{Reflection: true},
		Security: app.SecurityConfig{
			TLSCert: gwCert, TLSKey: gwKeyFile, TLSClientCA: s.PKI.CAFile(),
			AuditLog: s.GatewayAudit,
		},
		CredentialsAddr:       s.CredsAddr,
		CredentialsTLS:        tlsutil.Files{CAFile: s.PKI.CAFile(), CertFile: gwCert, KeyFile: gwKeyFile},
		CredentialsServerName: "localhost",
		Vault:                 app.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: gwKey},
		Redis:                 app.RedisConfig{Addrs: []string{rs.Addr}},
		RedisPrefix:           s.Prefix,
		AllowedUpstreams:      simHost,
		FleetUpRate:           100,
	}
	if opts.Gateway != nil {
		opts.Gateway(&gwCfg)
	}
	gwDeps := app.Deps{Logger: logger, HandleKeys: handleKeys}
	if opts.GatewayDeps != nil {
		opts.GatewayDeps(&gwDeps)
	}
	s.Gateway, s.GatewayAddr = serve(t, func(ctx context.Context) (*server.Server, func(), error) {
		built, err := app.BuildGateway(ctx, gwCfg, gwDeps)
		if err != nil {
			return nil, nil, err
		}
		return built.GRPC, built.Close, nil
	})
	if !opts.NoSeed {
		s.seed(t)
	}
	return s
}

// serve serves a built server on a loopback port until the test ends.
func serve(t *testing.T, build func(context.Context) (*server.Server, func(), error)) (*server.Server, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv, closeAll, err := build(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = srv.ServeListener(ctx, lis); closeAll(); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv, lis.Addr().String()
}

func (s *Stack) seed(t *testing.T) {
	t.Helper()
	acme := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme}))
	globex := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalGlobex}))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, put := range []struct {
		client credentialsv1.CredentialServiceClient
		req    *credentialsv1.PutCredentialRequest
	}{
		{acme, WialonPut(TenantAcme, CredWialon, simulator.DemoWialonToken, s.SimURL)},
		{acme, &credentialsv1.PutCredentialRequest{TenantId: TenantAcme, CredentialId: CredFleetUp,
			Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
				ApiKey: simulator.DemoFleetUpAPIKey, AccountId: simulator.DemoFleetUpAccountID, Secret: simulator.DemoFleetUpSecret, BaseUrl: s.SimURL}}}},
		{globex, WialonPut(TenantGlobex, CredWialon, simulator.DemoWialonToken, s.SimURL)},
	} {
		if _, err := put.client.PutCredential(ctx, put.req); err != nil {
			t.Fatalf("seed %s/%s: %v", put.req.GetTenantId(), put.req.GetCredentialId(), err)
		}
	}
}

// WialonPut is a PutCredential request for a Wialon token.
func WialonPut(tenant, id, token, baseURL string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: baseURL}}}
}

// Identity is what a caller brings. Certificate fields make a client
// certificate from CA (default: the stack's own CA) with exactly those
// names; none of them means no certificate. APIKey is sent as x-api-key.
type Identity struct {
	URI, DNS, CN string
	APIKey       string
	CA           *testenv.PKI
}

var certSeq atomic.Int64

// Dial connects to addr over TLS as id. The connection closes when the
// test ends.
func (s *Stack) Dial(t *testing.T, addr string, id Identity) *grpc.ClientConn {
	t.Helper()
	roots := x509.NewCertPool()
	caPEM, err := os.ReadFile(s.PKI.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(caPEM)
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS13}
	if id.URI != "" || id.DNS != "" || id.CN != "" {
		ca := id.CA
		if ca == nil {
			ca = s.PKI
		}
		opts := testenv.IssueOptions{Client: true, CommonName: id.CN}
		if id.URI != "" {
			opts.URIs = []string{id.URI}
		}
		if id.DNS != "" {
			opts.DNSNames = []string{id.DNS}
		}
		if id.CN == "" {
			opts.CommonName = "client" // a CN is always there; only CN-only identities rely on it
		}
		certFile, keyFile := ca.Issue(t, fmt.Sprintf("client-%d", certSeq.Add(1)), opts)
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	dialOpts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	if id.APIKey != "" {
		dialOpts = append(dialOpts, grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, "x-api-key", id.APIKey), method, req, reply, cc, opts...)
		}))
	}
	conn, err := grpc.NewClient(addr, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// Issue issues a session handle for tenant's credential as that tenant's
// workload, with ttl (0: the default) and scopes (none: read).
func (s *Stack) Issue(t *testing.T, tenant, credentialID string, ttl time.Duration, scopes ...credentialsv1.Scope) *credentialsv1.IssueSessionResponse {
	t.Helper()
	principal := PrincipalAcme
	if tenant == TenantGlobex {
		principal = PrincipalGlobex
	}
	req := &credentialsv1.IssueSessionRequest{TenantId: tenant, CredentialId: credentialID, Scopes: scopes}
	if ttl > 0 {
		req.Ttl = durationpb.New(ttl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := credentialsv1.NewSessionServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: principal})).IssueSession(ctx, req)
	if err != nil {
		t.Fatalf("issue a session for %s/%s: %v", tenant, credentialID, err)
	}
	return resp
}

// WithHandle returns ctx carrying `authorization: Bearer <h>`.
func WithHandle(ctx context.Context, h string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+h)
}

// ReadAudit returns the records of an audit file, failing the test on a
// line that is not one whole JSON record.
func ReadAudit(t *testing.T, path string) []audit.Event {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []audit.Event
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var ev audit.Event
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ev); err != nil {
			t.Fatalf("%s: audit line %q: %v", path, sc.Text(), err)
		}
		out = append(out, ev)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// Outcomes returns the outcome records of method in events.
func Outcomes(events []audit.Event, method string) []audit.Event {
	var out []audit.Event
	for _, ev := range events {
		if ev.Phase == audit.PhaseOutcome && ev.Method == method {
			out = append(out, ev)
		}
	}
	return out
}

// AssertNoLeak fails the test if any of secrets appears in the services'
// logs, in either audit file, or anywhere in Redis (every key name and
// every value, whatever the type).
func (s *Stack) AssertNoLeak(t *testing.T, secrets ...string) {
	t.Helper()
	places := map[string]string{"logs": s.Logs.String()}
	for _, f := range []string{s.CredsAudit, s.GatewayAudit} {
		data, err := os.ReadFile(f)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		places[filepath.Base(f)] = string(data)
	}
	places["redis"] = DumpRedis(t, s.Redis)
	for _, secret := range secrets {
		if secret == "" {
			t.Fatal("AssertNoLeak: empty secret")
		}
		for where, text := range places {
			if strings.Contains(text, secret) {
				t.Errorf("a planted secret (%d characters, starting %.4q) is in the %s", len(secret), secret, where)
			}
		}
	}
}

// DumpRedis renders every key of the database and its value as text.
func DumpRedis(t *testing.T, rdb redis.UniversalClient) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	iter := rdb.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		key := iter.Val()
		b.WriteString(key + "\n")
		typ, err := rdb.Type(ctx, key).Result()
		if err != nil {
			t.Fatal(err)
		}
		var val any
		switch typ {
		case "string":
			val, err = rdb.Get(ctx, key).Result()
		case "hash":
			val, err = rdb.HGetAll(ctx, key).Result()
		case "zset":
			val, err = rdb.ZRangeWithScores(ctx, key, 0, -1).Result()
		case "set":
			val, err = rdb.SMembers(ctx, key).Result()
		case "list":
			val, err = rdb.LRange(ctx, key, 0, -1).Result()
		case "stream":
			val, err = rdb.XRange(ctx, key, "-", "+").Result()
		case "none":
			continue // expired meanwhile
		default:
			t.Fatalf("key %s has type %s, which DumpRedis cannot read", key, typ)
		}
		if err != nil && err != redis.Nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%v\n", val)
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	return b.String()
}
