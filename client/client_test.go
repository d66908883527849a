package client_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/client"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/simulator"
	"github.com/fleetbroker/fleetbroker/test/testserver"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const (
	tenant      = "acme"
	wialonToken = "ClientTest0123456789abcdefClientTest0123456789abcdefClientTest0123456789"
)

// countingSessions counts IssueSession calls.
type countingSessions struct {
	credentialsv1.SessionServiceClient
	issues atomic.Int64
}

func (c *countingSessions) IssueSession(ctx context.Context, in *credentialsv1.IssueSessionRequest, opts ...grpc.CallOption) (*credentialsv1.IssueSessionResponse, error) {
	c.issues.Add(1)
	return c.SessionServiceClient.IssueSession(ctx, in, opts...)
}

// fixture is a stack with one Wialon credential and a handle source for it
// whose connection to the gateway carries the source's dial options.
type fixture struct {
	st       *testserver.Stack
	sessions *countingSessions
	source   *client.HandleSource
	gateway  telematicsv1.TelematicsServiceClient
}

func newFixture(t *testing.T, id string, session client.Session, opts client.Options) *fixture {
	t.Helper()
	st := testserver.New(t, testserver.Options{})
	st.Sim.AddWialonToken(wialonToken)
	_, err := st.Credentials().PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: id,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: wialonToken, BaseUrl: st.SimURL}}})
	if err != nil {
		t.Fatal(err)
	}
	sessions := &countingSessions{SessionServiceClient: st.Sessions()}
	session.TenantID, session.CredentialID = tenant, id
	opts.AllowInsecure = true // bufconn: no TLS in process
	src := client.NewHandleSource(sessions, session, opts)
	t.Cleanup(src.Close)
	conn := st.DialGateway(0, src.DialOptions()...)
	return &fixture{st: st, sessions: sessions, source: src, gateway: telematicsv1.NewTelematicsServiceClient(conn)}
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestHandleSourceConcurrentCallersShareOneIssue(t *testing.T) {
	f := newFixture(t, "wialon-shared", client.Session{}, client.Options{})
	ctx := callCtx(t)
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{PageSize: 5}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("ListUnits: %v", err)
	}
	if n := f.sessions.issues.Load(); n != 1 {
		t.Errorf("IssueSession calls = %d, want 1 for 32 concurrent callers", n)
	}
	if id := f.source.SessionID(); !strings.HasPrefix(id, "ses_") {
		t.Errorf("SessionID = %q, want a ses_ id", id)
	}
}

func TestHandleSourceRenewsAheadOfExpiry(t *testing.T) {
	// A 3 s handle renewed 2 s before expiry: a new session within about a
	// second, while calls keep working throughout.
	f := newFixture(t, "wialon-renew", client.Session{TTL: 3 * time.Second}, client.Options{RenewBefore: 2 * time.Second})
	ctx := callCtx(t)
	if _, err := f.gateway.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
		t.Fatal(err)
	}
	first := f.source.SessionID()
	deadline := time.Now().Add(8 * time.Second)
	renewed := 0
	for prev := first; time.Now().Before(deadline) && renewed < 2; {
		if _, err := f.gateway.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
			t.Fatalf("call during renewal: %v", err)
		}
		if id := f.source.SessionID(); id != prev {
			renewed++
			prev = id
		}
		time.Sleep(50 * time.Millisecond) // pacing the probe calls, not synchronisation
	}
	if renewed < 2 {
		t.Fatalf("renewed %d times in 8 s with a 3 s handle renewed 2 s early, want ≥ 2", renewed)
	}
	// Renewal happened in the background, not on demand after expiry:
	// every handle was replaced before it expired, so no call waited.
	if n := f.sessions.issues.Load(); n < 3 {
		t.Errorf("IssueSession calls = %d, want ≥ 3", n)
	}
}

func TestHandleSourceReplacesRevokedHandle(t *testing.T) {
	f := newFixture(t, "wialon-revoked", client.Session{}, client.Options{})
	ctx := callCtx(t)
	if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	h, err := f.source.Handle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := f.source.SessionID()
	if _, err := f.st.Sessions().RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: h}); err != nil {
		t.Fatal(err)
	}
	// The gateway answers SESSION_INVALID; the interceptor issues a new
	// handle and the call succeeds.
	if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatalf("ListUnits after revocation: %v", err)
	}
	if after := f.source.SessionID(); after == before {
		t.Errorf("session %s still in use after revocation", after)
	}
	if err := f.source.Err(); err != nil {
		t.Errorf("source stopped after a revocation it could recover from: %v", err)
	}
}

func TestHandleSourceStopsWhenCredentialDeleted(t *testing.T) {
	f := newFixture(t, "wialon-deleted", client.Session{}, client.Options{})
	ctx := callCtx(t)
	if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.st.Credentials().DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: tenant, CredentialId: "wialon-deleted"}); err != nil {
		t.Fatal(err)
	}
	_, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	if !errors.Is(err, client.ErrStopped) || !client.IsCredentialGone(err) {
		t.Fatalf("ListUnits after delete = %v; want ErrStopped wrapping CREDENTIAL_NOT_FOUND", err)
	}
	issues := f.sessions.issues.Load()
	// Stopped means stopped: later calls fail at once, without asking the
	// credentials service again.
	for range 3 {
		if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); !errors.Is(err, client.ErrStopped) {
			t.Fatalf("call on a stopped source = %v, want ErrStopped", err)
		}
	}
	if n := f.sessions.issues.Load(); n != issues {
		t.Errorf("a stopped source issued %d more sessions", n-issues)
	}
	if _, err := f.source.Handle(ctx); !errors.Is(err, client.ErrStopped) {
		t.Errorf("Handle on a stopped source = %v, want ErrStopped", err)
	}
}

func TestHandleSourceStopsOnRejectedCredential(t *testing.T) {
	f := newFixture(t, "wialon-rejected", client.Session{}, client.Options{})
	ctx := callCtx(t)
	if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	// The customer revokes the token at Wialon: the gateway's next login is
	// refused, the credential is marked rejected, and no new handle helps.
	f.st.Sim.RemoveWialonToken(wialonToken)
	f.st.Sim.ExpireWialonSessions()
	_, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	if !client.IsCredentialRejected(err) {
		t.Fatalf("ListUnits with a revoked token = %v; want CREDENTIAL_REJECTED", err)
	}
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("code = %v, want FailedPrecondition", status.Code(err))
	}
	if _, ok := client.RetryDelay(err); ok {
		t.Error("a rejected credential carries RetryInfo; waiting does not help")
	}
}

func TestServiceConfigStaysInsideRetryBudget(t *testing.T) {
	// An upstream that always fails: the gateway tries it a bounded number
	// of times, the client's retry policy once more; a caller's call may
	// cost at most maxUpstreamPerCall upstream requests (docs/reliability.md).
	const maxUpstreamPerCall = 6
	f := newFixture(t, "wialon-down", client.Session{}, client.Options{})
	ctx := callCtx(t)
	if _, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err) // logged in and cached
	}
	before := f.st.Sim.Stats().Requests["wialon core/search_items"]
	f.st.Sim.SetFaults(simulator.Faults{ErrorRate: 1})
	_, err := f.gateway.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
	if status.Code(err) != codes.Unavailable || !client.IsRetryable(err) {
		t.Fatalf("ListUnits with the upstream down = %v; want UNAVAILABLE with RetryInfo", err)
	}
	got := f.st.Sim.Stats().Requests["wialon core/search_items"] - before
	// More than one gateway call's worth (3) shows the client's retry
	// policy ran; at most the budget shows it stopped there.
	if got <= 3 || got > maxUpstreamPerCall {
		t.Errorf("upstream requests for one caller call = %d, want 4..%d (one client retry, within budget)", got, maxUpstreamPerCall)
	}
}
