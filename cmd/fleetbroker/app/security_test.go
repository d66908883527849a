package app_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const (
	principalAcme    = "spiffe://example.org/ns/acme/sa/api"
	principalGlobex  = "spiffe://example.org/ns/globex/sa/api"
	principalGateway = "spiffe://example.org/ns/fleetbroker/sa/gateway"
	batchAPIKey      = "batch-api-key-canary-5e1d"
	secTenantA       = "acme"
	secTenantB       = "globex"
)

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// policyYAML grants acme's principal everything on acme (sessions: read
// only), globex's on globex, the batch API key reads on acme, the gateway
// resolution everywhere.
func policyYAML(extraTenantForAcme string) string {
	tenants := `["acme"]`
	if extraTenantForAcme != "" {
		tenants = `["acme", "` + extraTenantForAcme + `"]`
	}
	return `api_keys:
  - principal: key:batch
    sha256: "` + sha(batchAPIKey) + `"
grants:
  - principals: ["` + principalAcme + `"]
    tenants: ` + tenants + `
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
    scopes: [read]
  - principals: ["` + principalGlobex + `"]
    tenants: ["globex"]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
  - principals: ["key:batch"]
    tenants: ["acme"]
    actions: [credentials.read]
  - principals: ["` + principalGateway + `"]
    tenants: ["*"]
    actions: [sessions.resolve]
`
}

// writeAtomically replaces path the way editors and Kubernetes do.
func writeAtomically(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// secureStack is `fleetbroker credentials` with mTLS, a policy file and an
// audit log, and `fleetbroker gateway` dialing it with its own certificate.
type secureStack struct {
	pki         *testenv.PKI
	credsAddr   string
	gatewayAddr string
	policyFile  string
	auditFile   string
	logs        *syncBuffer
	sim         *simulator.Simulator
	simURL      string
	// prefix is the stack's --redis-prefix, in redis.
	prefix string
	redis  redis.UniversalClient
}

func startSecureStack(t *testing.T, rateLimitPrincipal int) *secureStack {
	t.Helper()
	return startSecureStackWith(t, func(cfg *app.CredentialsConfig) { cfg.Security.RateLimitPrincipal = rateLimitPrincipal })
}

func startSecureStackWith(t *testing.T, adjust func(*app.CredentialsConfig)) *secureStack {
	t.Helper()
	st := &secureStack{pki: testenv.NewPKI(t), logs: &syncBuffer{}}
	dir := t.TempDir()
	st.policyFile = filepath.Join(dir, "policy.yaml")
	st.auditFile = filepath.Join(dir, "audit.log")
	writeAtomically(t, st.policyFile, policyYAML(""))
	logger := slog.New(slog.NewJSONHandler(st.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	st.sim = simulator.New(simulator.Config{Demo: true})
	simServer := httptest.NewServer(st.sim.Handler())
	t.Cleanup(simServer.Close)
	st.simURL = simServer.URL

	rs := testenv.Redis(t)
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
	credCert, credKeyFile := st.pki.Issue(t, "credentials", testenv.IssueOptions{DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	gwCert, gwKeyFile := st.pki.Issue(t, "gateway", testenv.IssueOptions{URIs: []string{principalGateway}, DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}})
	prefix := testenv.RedisPrefix(t)
	st.prefix, st.redis = prefix, rs.Client(t)
	handleKeys, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	credCfg := app.CredentialsConfig{
		Server: server.Config{Reflection: true},
		Security: app.SecurityConfig{
			TLSCert: credCert, TLSKey: credKeyFile, TLSClientCA: st.pki.CAFile(),
			PolicyFile: st.policyFile, AuditLog: st.auditFile,
		},
		Vault:            app.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: credKey},
		Redis:            app.RedisConfig{Addrs: []string{rs.Addr}},
		RedisPrefix:      prefix,
		AllowedUpstreams: strings.TrimPrefix(simServer.URL, "http://"),
	}
	adjust(&credCfg)
	st.credsAddr = serveBuilt(t, func(ctx context.Context) (*server.Server, func(), error) {
		return asServer(app.BuildCredentials(ctx, credCfg, app.Deps{Logger: logger, HandleKeys: handleKeys}))
	})
	gwCfg := app.GatewayConfig{
		Security:              app.SecurityConfig{TLSCert: gwCert, TLSKey: gwKeyFile},
		CredentialsAddr:       st.credsAddr,
		CredentialsTLS:        tlsutil.Files{CAFile: st.pki.CAFile(), CertFile: gwCert, KeyFile: gwKeyFile},
		CredentialsServerName: "localhost",
		Vault:                 app.VaultConfig{Addr: vs.Addr, Token: vs.RootToken, Key: gwKey},
		Redis:                 app.RedisConfig{Addrs: []string{rs.Addr}},
		RedisPrefix:           prefix,
		AllowedUpstreams:      strings.TrimPrefix(simServer.URL, "http://"),
		FleetUpRate:           100,
	}
	st.gatewayAddr = serveBuilt(t, func(ctx context.Context) (*server.Server, func(), error) {
		return asServer(app.BuildGateway(ctx, gwCfg, app.Deps{Logger: logger, HandleKeys: handleKeys}))
	})
	return st
}

// asServer is what a Build returned, as serveBuilt takes it.
func asServer(b *app.Built, err error) (*server.Server, func(), error) {
	if err != nil {
		return nil, nil, err
	}
	return b.GRPC, b.Close, nil
}

// serveBuilt serves a built server on a loopback port until the test ends.
func serveBuilt(t *testing.T, build func(context.Context) (*server.Server, func(), error)) string {
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
	return lis.Addr().String()
}

// dial connects with the client certificate of principal (URI SAN); an empty
// principal dials without a certificate; ca overrides the trusted CA.
func (st *secureStack) dial(t *testing.T, addr string, clientPKI *testenv.PKI, principal string) *grpc.ClientConn {
	t.Helper()
	roots := x509.NewCertPool()
	caPEM, err := os.ReadFile(st.pki.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(caPEM)
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS13}
	if principal != "" {
		certFile, keyFile := clientPKI.Issue(t, strings.NewReplacer("/", "_", ":", "_").Replace(principal), testenv.IssueOptions{URIs: []string{principal}, Client: true})
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func wialonPut(tenant, id, simURL string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: simURL}}}
}

func TestMTLSMatrix(t *testing.T) {
	st := startSecureStack(t, 0)
	otherCA := testenv.NewPKI(t)
	tests := []struct {
		name      string
		conn      func() *grpc.ClientConn
		wantCodes []codes.Code
	}{
		{"no client certificate", func() *grpc.ClientConn { return st.dial(t, st.credsAddr, nil, "") }, []codes.Code{codes.Unavailable}},
		{"certificate from another CA", func() *grpc.ClientConn { return st.dial(t, st.credsAddr, otherCA, principalAcme) }, []codes.Code{codes.Unavailable}},
		{"right CA, principal without a grant", func() *grpc.ClientConn {
			return st.dial(t, st.credsAddr, st.pki, "spiffe://example.org/ns/other/sa/x")
		}, []codes.Code{codes.PermissionDenied}},
		{"right CA, right principal", func() *grpc.ClientConn { return st.dial(t, st.credsAddr, st.pki, principalAcme) }, []codes.Code{codes.OK}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := credentialsv1.NewCredentialServiceClient(tt.conn()).ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA})
			if got := status.Code(err); got != tt.wantCodes[0] {
				t.Fatalf("ListCredentials = %v, want %v", err, tt.wantCodes[0])
			}
		})
	}
	// Plaintext is refused by a TLS server.
	plain, err := grpc.NewClient(st.credsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := credentialsv1.NewCredentialServiceClient(plain).ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA}); err == nil {
		t.Fatal("plaintext client was served by a TLS server")
	}
}

func TestTenantIsolationGatewayOnlyRPCsAndAudit(t *testing.T) {
	st := startSecureStack(t, 0)
	ctx := context.Background()
	acme := st.dial(t, st.credsAddr, st.pki, principalAcme)
	globex := st.dial(t, st.credsAddr, st.pki, principalGlobex)
	acmeCreds, acmeSessions := credentialsv1.NewCredentialServiceClient(acme), credentialsv1.NewSessionServiceClient(acme)
	globexCreds, globexSessions := credentialsv1.NewCredentialServiceClient(globex), credentialsv1.NewSessionServiceClient(globex)

	if _, err := acmeCreds.PutCredential(ctx, wialonPut(secTenantA, "w", st.simURL)); err != nil {
		t.Fatal(err)
	}
	issued, err := acmeSessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: secTenantA, CredentialId: "w"})
	if err != nil {
		t.Fatal(err)
	}
	denied := []struct {
		name string
		call func() error
	}{
		{"globex reads acme", func() error {
			_, err := globexCreds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: secTenantA, CredentialId: "w"})
			return err
		}},
		{"globex lists acme", func() error {
			_, err := globexCreds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA})
			return err
		}},
		{"globex writes acme", func() error {
			_, err := globexCreds.PutCredential(ctx, wialonPut(secTenantA, "evil", st.simURL))
			return err
		}},
		{"globex issues for acme", func() error {
			_, err := globexSessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: secTenantA, CredentialId: "w"})
			return err
		}},
		{"globex revokes acme's session", func() error {
			_, err := globexSessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: issued.GetHandle()})
			return err
		}},
		{"acme grants a scope beyond its grant", func() error {
			_, err := acmeSessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: secTenantA, CredentialId: "w", Scopes: []credentialsv1.Scope{credentialsv1.Scope_SCOPE_RAW}})
			return err
		}},
		{"acme resolves a handle (gateway only)", func() error {
			_, err := acmeSessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
			return err
		}},
		{"acme asks for the secret (gateway only)", func() error {
			_, err := acmeSessions.ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: issued.GetHandle()})
			return err
		}},
		{"acme mints an upstream session (gateway only)", func() error {
			_, err := acmeSessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: issued.GetHandle(), CredentialGeneration: "g"})
			return err
		}},
		{"acme asks which generations are retired (gateway only)", func() error {
			_, err := acmeSessions.ListRetiredGenerations(ctx, &credentialsv1.ListRetiredGenerationsRequest{TenantId: secTenantA,
				Generations: []*credentialsv1.CredentialGeneration{{CredentialId: "w", Generation: "g"}}})
			return err
		}},
	}
	for _, tt := range denied {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); status.Code(err) != codes.PermissionDenied {
				t.Fatalf("got %v, want PermissionDenied", err)
			}
		})
	}

	// The gateway, with its own certificate, resolves the handle and serves.
	gw := telematicsv1.NewTelematicsServiceClient(st.dial(t, st.gatewayAddr, st.pki, principalAcme))
	hctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+issued.GetHandle())
	units, err := gw.ListUnits(hctx, &telematicsv1.ListUnitsRequest{})
	if err != nil || len(units.GetUnits()) == 0 {
		t.Fatalf("gateway over mTLS: %v, %v", units, err)
	}
	if _, err := acmeSessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: issued.GetHandle()}); err != nil {
		t.Fatal(err)
	}

	// The audit trail: one JSON line per call, denials included, no secret
	// and no handle anywhere; logs likewise.
	raw, err := os.ReadFile(st.auditFile)
	if err != nil {
		t.Fatal(err)
	}
	results := map[string]int{}
	methods := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var ev map[string]string
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("audit line is not JSON: %q", line)
		}
		results[ev["result"]]++
		methods[ev["method"]] = true
		if ev["request_id"] == "" || ev["principal"] == "" && ev["result"] != "denied" {
			t.Errorf("audit event without request id or principal: %v", ev)
		}
	}
	if results["denied"] < len(denied) || results["ok"] < 4 {
		t.Errorf("audit results %v: want every denial and every success recorded", results)
	}
	for _, m := range []string{credentialsv1.CredentialService_PutCredential_FullMethodName, credentialsv1.SessionService_IssueSession_FullMethodName,
		credentialsv1.SessionService_ResolveSession_FullMethodName, credentialsv1.SessionService_ResolveSecret_FullMethodName, credentialsv1.SessionService_RevokeSession_FullMethodName} {
		if !methods[m] {
			t.Errorf("no audit event for %s", m)
		}
	}
	for _, secret := range []string{simulator.DemoWialonToken, issued.GetHandle()} {
		if strings.Contains(string(raw), secret) || strings.Contains(st.logs.String(), secret) {
			t.Errorf("a secret or handle is in the audit trail or logs")
		}
	}
}

func TestAPIKeysAndPolicyReload(t *testing.T) {
	st := startSecureStack(t, 0)
	// An mTLS connection without a grant, carrying API keys per call.
	conn := st.dial(t, st.credsAddr, st.pki, "spiffe://example.org/ns/nobody/sa/x")
	creds := credentialsv1.NewCredentialServiceClient(conn)
	withKey := func(key string) context.Context {
		return metadata.AppendToOutgoingContext(context.Background(), "x-api-key", key)
	}
	// The certificate wins over the key: the key is only for callers without mTLS.
	if _, err := creds.ListCredentials(withKey(batchAPIKey), &credentialsv1.ListCredentialsRequest{TenantId: secTenantA}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("certificate principal should decide: %v", err)
	}

	acme := credentialsv1.NewCredentialServiceClient(st.dial(t, st.credsAddr, st.pki, principalAcme))
	ctx := context.Background()
	if _, err := acme.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantB}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("before reload: %v", err)
	}
	// A good new policy gives acme's principal globex too, at once.
	writeAtomically(t, st.policyFile, policyYAML(secTenantB))
	waitFor(t, func() bool {
		_, err := acme.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantB})
		return err == nil
	})
	// A broken policy is rejected as a whole: the last good one stays.
	writeAtomically(t, st.policyFile, "grants:\n  - principals: [x]\n    tenants: [\"*\"]\n    actions: [credentials.delete]\n")
	time.Sleep(1500 * time.Millisecond)
	if _, err := acme.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantB}); err != nil {
		t.Fatalf("a broken policy replaced the good one: %v", err)
	}
	if !strings.Contains(st.logs.String(), "credentials.delete") {
		t.Error("the rejected policy's problem was not logged")
	}
}

func TestRateLimitPerPrincipalTripsAndRecovers(t *testing.T) {
	st := startSecureStack(t, 2)
	acme := credentialsv1.NewCredentialServiceClient(st.dial(t, st.credsAddr, st.pki, principalAcme))
	ctx := context.Background()
	limited := false
	for range 10 {
		_, err := acme.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA})
		if status.Code(err) == codes.ResourceExhausted {
			limited = true
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !limited {
		t.Fatal("10 calls at once never hit a 2/s limit")
	}
	// Another principal has its own budget.
	globex := credentialsv1.NewCredentialServiceClient(st.dial(t, st.credsAddr, st.pki, principalGlobex))
	if _, err := globex.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantB}); err != nil {
		t.Fatalf("one principal's limit hit another: %v", err)
	}
	waitFor(t, func() bool {
		_, err := acme.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA})
		return err == nil
	})
}

// TestRateLimitBudgetsStayUnderTheirRedisPrefix: two deployments sharing
// one Redis under different --redis-prefix values keep apart budgets. The
// caller budgets used to live under a fixed "fb:api:rl", so a principal
// limited by one deployment was limited by the other too.
func TestRateLimitBudgetsStayUnderTheirRedisPrefix(t *testing.T) {
	one, other := startSecureStack(t, 1), startSecureStack(t, 1) // each its own RedisPrefix
	if one.prefix == other.prefix {
		t.Fatalf("both stacks use prefix %q", one.prefix)
	}
	ctx := context.Background()
	list := func(st *secureStack) error {
		c := credentialsv1.NewCredentialServiceClient(st.dial(t, st.credsAddr, st.pki, principalAcme))
		_, err := c.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA})
		return err
	}
	spent := false
	for range 10 {
		err := list(one)
		if status.Code(err) == codes.ResourceExhausted {
			spent = true
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !spent {
		t.Fatal("10 calls at once never hit a 1/s limit")
	}
	// Within the second acme's budget in the first deployment is spent,
	// its budget in the other is untouched.
	if err := list(other); err != nil {
		t.Fatalf("a budget spent under prefix %s limited the deployment under %s: %v", one.prefix, other.prefix, err)
	}
	keys, err := one.redis.Keys(ctx, "rate:"+one.prefix+":*").Result()
	if err != nil || len(keys) == 0 {
		t.Fatalf("no rate-limit key under rate:%s:* (%v): the budgets are not kept under the deployment's prefix", one.prefix, err)
	}
}

func TestPlaintextNeedsInsecure(t *testing.T) {
	_, err := server.New(server.Config{})
	if err == nil || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("a server without TLS and without Insecure started: %v", err)
	}
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// With optional client certificates, an API-key caller over TLS is served,
// health answers a caller with no identity, and every other call without
// one is UNAUTHENTICATED.
func TestAPIKeyOverTLSWithOptionalClientCerts(t *testing.T) {
	st := startSecureStackWith(t, func(cfg *app.CredentialsConfig) { cfg.Security.ClientCertOptional = true })
	conn := st.dial(t, st.credsAddr, nil, "")
	creds := credentialsv1.NewCredentialServiceClient(conn)
	ctx := context.Background()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health without identity: %v", err)
	}
	if _, err := creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no identity: %v, want Unauthenticated", err)
	}
	keyCtx := metadata.AppendToOutgoingContext(ctx, "x-api-key", batchAPIKey)
	if _, err := creds.ListCredentials(keyCtx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA}); err != nil {
		t.Fatalf("API key caller: %v", err)
	}
	if _, err := creds.ListCredentials(keyCtx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantB}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("API key caller on another tenant: %v, want PermissionDenied", err)
	}
	badCtx := metadata.AppendToOutgoingContext(ctx, "x-api-key", "not-a-key")
	if _, err := creds.ListCredentials(badCtx, &credentialsv1.ListCredentialsRequest{TenantId: secTenantA}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("unknown API key: %v, want Unauthenticated", err)
	}
	if strings.Contains(st.logs.String(), batchAPIKey) {
		t.Fatal("an API key is in the logs")
	}
}
