package authz_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/policy"
)

const (
	listed   = "/test.v1.Listed/Call"
	unlisted = "/test.v1.Unlisted/Call"
	apiKey   = "authz-test-key-canary"
)

// serviceDesc is a one-method service whose handler counts its calls.
func serviceDesc(name string, calls *atomic.Int64) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: name,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Call", Handler: func(_ any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(context.Context, any) (any, error) { calls.Add(1); return &emptypb.Empty{}, nil }
			return icpt(ctx, in, &grpc.UnaryServerInfo{FullMethod: "/" + name + "/Call"}, h)
		}}},
	}
}

// syncWriter collects audit lines; fail makes every Write fail.
type syncWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	fail atomic.Bool
}

func (w *syncWriter) Write(p []byte) (int, error) {
	if w.fail.Load() {
		return 0, errors.New("no space left on device")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// start serves both test services and health behind an Authorizer whose
// policy grants the API key everything, with only listed given a rule.
func start(t *testing.T, adjust ...func(*authz.Config)) (*grpc.ClientConn, *authz.Authorizer, *syncWriter, *atomic.Int64) {
	t.Helper()
	pol, err := policy.Parse([]byte(`api_keys:
  - principal: key:tester
    sha256: "`+sha(apiKey)+`"
grants:
  - principals: ["key:tester", "spiffe://example.org/ns/mesh/sa/caller"]
    tenants: ["*"]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke, sessions.resolve]
`), policy.FormatYAML)
	if err != nil {
		t.Fatal(err)
	}
	w := &syncWriter{}
	al := audit.New(w)
	t.Cleanup(func() { al.Close() })
	cfg := authz.Config{Policy: policy.Static(pol), Audit: al, RequirePrincipal: true,
		Methods: authz.Rules(map[string]policy.Action{listed: policy.CredentialsRead}, nil)}
	for _, f := range adjust {
		f(&cfg)
	}
	a := authz.New(cfg)
	var calls atomic.Int64
	srv := grpc.NewServer(grpc.UnaryInterceptor(a.UnaryServerInterceptor()))
	srv.RegisterService(serviceDesc("test.v1.Listed", &calls), nil)
	srv.RegisterService(serviceDesc("test.v1.Unlisted", &calls), nil)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	if got := a.Unlisted(srv.GetServiceInfo()); len(got) != 1 || got[0] != unlisted {
		t.Errorf("Unlisted = %v, want [%s]", got, unlisted)
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, a, w, &calls
}

func invoke(conn *grpc.ClientConn, method string) error {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), authz.APIKeyHeader, apiKey), 5*time.Second)
	defer cancel()
	return conn.Invoke(ctx, method, &emptypb.Empty{}, &emptypb.Empty{})
}

// TestUnlistedMethodIsRefusedToEveryone: a method without a rule is refused
// even to a principal the policy grants every action, and the refusal is
// on record; health needs no rule.
func TestUnlistedMethodIsRefusedToEveryone(t *testing.T) {
	conn, _, w, calls := start(t)
	if err := invoke(conn, listed); err != nil {
		t.Fatalf("listed method: %v", err)
	}
	err := invoke(conn, unlisted)
	if status.Code(err) != codes.PermissionDenied || apierr.Reason(err) != apierr.ReasonMethodNotAuthorized {
		t.Fatalf("unlisted method: %v, want PERMISSION_DENIED %s", err, apierr.ReasonMethodNotAuthorized)
	}
	if calls.Load() != 1 {
		t.Errorf("handlers ran %d times, want once (the listed method)", calls.Load())
	}
	if _, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health: %v", err)
	}
	if !strings.Contains(w.String(), `"method":"`+unlisted+`","result":"denied"`) {
		t.Errorf("the refusal is not on record:\n%s", w.String())
	}
}

// TestIntentFailureRefusesTheCall: when the intent record cannot be
// written the handler never runs and the caller gets UNAVAILABLE.
func TestIntentFailureRefusesTheCall(t *testing.T) {
	conn, _, w, calls := start(t)
	w.fail.Store(true)
	err := invoke(conn, listed)
	if status.Code(err) != codes.Unavailable || apierr.Reason(err) != apierr.ReasonAuditUnavailable {
		t.Fatalf("got %v, want UNAVAILABLE %s", err, apierr.ReasonAuditUnavailable)
	}
	if calls.Load() != 0 {
		t.Error("the handler ran without an intent record")
	}
	w.fail.Store(false)
	if err := invoke(conn, listed); err != nil {
		t.Fatal(err)
	}
	out := w.String()
	if !strings.Contains(out, `"phase":"intent"`) || !strings.Contains(out, `"phase":"outcome"`) || strings.Contains(out, apiKey) {
		t.Errorf("want an intent and an outcome record, without the key:\n%s", out)
	}
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// TestTrustedHeaderOnlyInURIForm: behind a sidecar, the header names the
// caller only from a trusted proxy and only as a URI (what the proxy
// verified); a bare name could pose as an API key's or a DNS SAN's.
func TestTrustedHeaderOnlyInURIForm(t *testing.T) {
	conn, _, w, _ := start(t, func(c *authz.Config) {
		c.TrustedHeader = "x-client-identity"
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	})
	call := func(identity string) error {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-client-identity", identity), 5*time.Second)
		defer cancel()
		return conn.Invoke(ctx, listed, &emptypb.Empty{}, &emptypb.Empty{})
	}
	if err := call("spiffe://example.org/ns/mesh/sa/caller"); err != nil {
		t.Fatalf("URI identity from a trusted proxy: %v", err)
	}
	for _, id := range []string{"key:tester", "tester", "dns:caller"} {
		if err := call(id); status.Code(err) != codes.Unauthenticated {
			t.Errorf("header %q: %v, want Unauthenticated", id, err)
		}
	}
	if !strings.Contains(w.String(), `"principal":"spiffe://example.org/ns/mesh/sa/caller","via":"header"`) {
		t.Errorf("the header identity is not on record with its source:\n%s", w.String())
	}
}

// TestTrustedXFCCHeader: behind an Istio/Envoy sidecar the principal is the
// URI SAN of the last x-forwarded-client-cert element (the sidecar's), not
// anything a client wrote before it.
func TestTrustedXFCCHeader(t *testing.T) {
	conn, _, w, _ := start(t, func(c *authz.Config) {
		c.TrustedHeader = "x-forwarded-client-cert"
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	})
	call := func(xfcc string) error {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-forwarded-client-cert", xfcc), 5*time.Second)
		defer cancel()
		return conn.Invoke(ctx, listed, &emptypb.Empty{}, &emptypb.Empty{})
	}
	const caller = "spiffe://example.org/ns/mesh/sa/caller"
	if err := call(`By=spiffe://example.org/ns/fleetbroker/sa/credentials;Hash=ab;Subject="";URI=` + caller); err != nil {
		t.Fatalf("XFCC from a trusted proxy: %v", err)
	}
	if !strings.Contains(w.String(), `"principal":"`+caller+`","via":"header"`) {
		t.Errorf("the XFCC identity is not on record with its source:\n%s", w.String())
	}
	for _, xfcc := range []string{
		`By=spiffe://example.org/x;Hash=ab;DNS=caller.example.org`,              // no URI SAN
		`URI=` + caller + `,By=spiffe://example.org/x;Hash=ab`,                  // the sidecar's element names nobody
		`URI=` + caller + `;URI=spiffe://example.org/ns/fleetbroker/sa/gateway`, // ambiguous
	} {
		if err := call(xfcc); status.Code(err) != codes.Unauthenticated {
			t.Errorf("XFCC %q: %v, want Unauthenticated", xfcc, err)
		}
	}
}
