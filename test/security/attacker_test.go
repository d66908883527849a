package security_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

var requestSeq atomic.Int64

// newRequestID is a request id the caller sends, to find the call's audit
// records.
func newRequestID(_ *testing.T) string {
	return fmt.Sprintf("attack-%d-%d", time.Now().UnixNano()%1e6, requestSeq.Add(1))
}

// credentialsRPC calls one RPC of the credentials service against acme's
// Wialon credential; h is a live acme handle for the RPCs that take one.
type credentialsRPC struct {
	method string
	call   func(ctx context.Context, conn *grpc.ClientConn, h string) error
}

func credentialsRPCs(simURL string) []credentialsRPC {
	creds := func(c *grpc.ClientConn) credentialsv1.CredentialServiceClient {
		return credentialsv1.NewCredentialServiceClient(c)
	}
	sess := func(c *grpc.ClientConn) credentialsv1.SessionServiceClient {
		return credentialsv1.NewSessionServiceClient(c)
	}
	return []credentialsRPC{
		{credentialsv1.CredentialService_PutCredential_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).PutCredential(ctx, WialonPut(TenantAcme, CredWialon, attackerToken, simURL))
			return err
		}},
		{credentialsv1.CredentialService_BatchPutCredentials_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).BatchPutCredentials(ctx, &credentialsv1.BatchPutCredentialsRequest{TenantId: TenantAcme, Items: []*credentialsv1.BatchPutItem{
				{CredentialId: CredWialon, Secret: &credentialsv1.BatchPutItem_Wialon{Wialon: &credentialsv1.WialonSecret{Token: attackerToken, BaseUrl: simURL}}}}})
			return err
		}},
		{credentialsv1.CredentialService_GetCredential_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
			return err
		}},
		{credentialsv1.CredentialService_ListCredentials_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: TenantAcme})
			return err
		}},
		{credentialsv1.CredentialService_DeleteCredential_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
			return err
		}},
		{credentialsv1.CredentialService_ValidateCredential_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := creds(c).ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
			return err
		}},
		{credentialsv1.SessionService_IssueSession_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, _ string) error {
			_, err := sess(c).IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: TenantAcme, CredentialId: CredWialon})
			return err
		}},
		{credentialsv1.SessionService_RevokeSession_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, h string) error {
			_, err := sess(c).RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: h})
			return err
		}},
		{credentialsv1.SessionService_ResolveSession_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, h string) error {
			_, err := sess(c).ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: h})
			return err
		}},
		{credentialsv1.SessionService_ResolveSecret_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, h string) error {
			_, err := sess(c).ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: h})
			return err
		}},
		{credentialsv1.SessionService_ReportRejection_FullMethodName, func(ctx context.Context, c *grpc.ClientConn, h string) error {
			_, err := sess(c).ReportRejection(ctx, &credentialsv1.ReportRejectionRequest{Handle: h, CredentialVersion: 1, Reason: "attacker"})
			return err
		}},
	}
}

// attackerToken is a 72-character Wialon token an attacker tries to plant.
const attackerToken = "attackerCanaryWialonToken000000000000000000000000000000000000000000000001"

// TestAttackerCallsEveryCredentialsRPC calls every RPC of the credentials
// service against tenant acme as every identity that must not reach it:
// unknown workloads, another tenant's, and each form that collides with a
// real principal's name. Every call is refused, on record as denied, and
// no answer, log line, audit record or Redis value holds a secret.
func TestAttackerCallsEveryCredentialsRPC(t *testing.T) {
	s := Start(t, Options{Credentials: func(c *app.CredentialsConfig) { c.Security.ClientCertOptional = true }})
	live := s.Issue(t, TenantAcme, CredWialon, 0)
	otherCA := testenv.NewPKI(t)
	attackers := []struct {
		name string
		id   Identity
	}{
		{"workload without a grant", Identity{URI: "spiffe://example.org/ns/nobody/sa/x"}},
		{"another tenant's workload", Identity{URI: PrincipalGlobex}},
		{"CN spelling the gateway's SPIFFE ID", Identity{CN: PrincipalGateway}},
		{"CN spelling acme's SPIFFE ID", Identity{CN: PrincipalAcme}},
		{"DNS SAN named like the API key", Identity{DNS: "billing-batch"}},
		{"URI SAN spelling the API key principal", Identity{URI: "key:billing-batch"}},
		{"DNS SAN spelling a dns: principal twice", Identity{DNS: "dns:" + DNSReporting}},
		{"unknown API key", Identity{APIKey: "not-a-key-canary-31b7"}},
		{"API key with the gateway's certificate name as key", Identity{APIKey: PrincipalGateway}},
		{"read-only API key writing", Identity{APIKey: KeyBillingBatch}},
		{"no identity at all", Identity{}},
		// Go's client sends no certificate the server's CA list does not
		// name; with optional client certificates the call then has no identity.
		{"certificate from another CA", Identity{URI: PrincipalGateway, CA: otherCA}},
	}
	for _, at := range attackers {
		t.Run(at.name, func(t *testing.T) {
			conn := s.Dial(t, s.CredsAddr, at.id)
			for _, rpc := range credentialsRPCs(s.SimURL) {
				if at.id.APIKey == KeyBillingBatch && (rpc.method == credentialsv1.CredentialService_GetCredential_FullMethodName ||
					rpc.method == credentialsv1.CredentialService_ListCredentials_FullMethodName || rpc.method == credentialsv1.SessionService_IssueSession_FullMethodName) {
					continue // granted to that key
				}
				id := newRequestID(t)
				ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), requestid.Header, id), 10*time.Second)
				err := rpc.call(ctx, conn, live.GetHandle())
				cancel()
				code := status.Code(err)
				if at.id.CA != nil && code == codes.Unavailable {
					continue // the handshake failed: nothing reached a handler or the trail
				}
				if code != codes.PermissionDenied && code != codes.Unauthenticated {
					t.Errorf("%s: %v, want PermissionDenied or Unauthenticated", rpc.method, err)
					continue
				}
				if err != nil && strings.Contains(err.Error(), live.GetHandle()) {
					t.Errorf("%s: the error repeats the handle", rpc.method)
				}
				assertDenied(t, s.CredsAudit, id, rpc.method)
			}
		})
	}
	// The secret and the handle were never shown, and nothing changed.
	assertUnchanged(t, s)
	s.AssertNoLeak(t, simulator.DemoWialonToken, simulator.DemoFleetUpSecret, live.GetHandle(), attackerToken, KeyBillingBatch, "not-a-key-canary-31b7")
}

// assertDenied finds the outcome record of the call with request id id.
func assertDenied(t *testing.T, auditFile, id, method string) {
	t.Helper()
	for _, ev := range ReadAudit(t, auditFile) {
		if ev.RequestID != id {
			continue
		}
		// Calls whose tenant only the handler learns (RevokeSession) pass
		// the interceptor with an intent record and are denied inside.
		if ev.Phase == audit.PhaseOutcome {
			if ev.Result != audit.ResultDenied || ev.Method != method {
				t.Errorf("%s: audit outcome %+v, want denied", method, ev)
			}
			return
		}
	}
	t.Errorf("%s: no audit record of the refused call %s", method, id)
}

// assertUnchanged: acme's Wialon credential is still the seeded one.
func assertUnchanged(t *testing.T, s *Stack) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme})).
		GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
	if err != nil {
		t.Fatalf("acme's credential is gone: %v", err)
	}
	if got.GetCredential().GetVersion() != 1 {
		t.Errorf("acme's credential was replaced: version %d", got.GetCredential().GetVersion())
	}
}

// gatewayRPC calls one RPC of the gateway, draining a stream's first
// message to learn its status.
type gatewayRPC struct {
	method string
	call   func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error
}

func gatewayRPCs() []gatewayRPC {
	return []gatewayRPC{
		{telematicsv1.TelematicsService_ListUnits_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			_, err := c.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
			return err
		}},
		{telematicsv1.TelematicsService_GetLatestPositions_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			_, err := c.GetLatestPositions(ctx, &telematicsv1.GetLatestPositionsRequest{})
			return err
		}},
		{telematicsv1.TelematicsService_GetPositionHistory_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			_, err := c.GetPositionHistory(ctx, historyRequest())
			return err
		}},
		{telematicsv1.TelematicsService_ListTrips_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			_, err := c.ListTrips(ctx, tripsRequest())
			return err
		}},
		{telematicsv1.TelematicsService_WatchPositions_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			st, err := c.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{})
			if err != nil {
				return err
			}
			_, err = st.Recv()
			return err
		}},
		{telematicsv1.TelematicsService_CallProvider_FullMethodName, func(ctx context.Context, c telematicsv1.TelematicsServiceClient) error {
			_, err := c.CallProvider(ctx, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{
				Wialon: &telematicsv1.WialonCall{Svc: "core/search_items"}}})
			return err
		}},
	}
}

// TestAttackerCallsEveryGatewayRPC calls every RPC of the gateway with
// every handle that must not open a session: none, malformed, forged
// (well-formed, never issued), revoked, expired, and a read-only one on the
// raw pass-through. Every call is refused and on record.
func TestAttackerCallsEveryGatewayRPC(t *testing.T) {
	s := Start(t, Options{})
	// Well-formed and signed, but with a key that is not the broker's.
	attackerKeys, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	forged, _, err := attackerKeys.New()
	if err != nil {
		t.Fatal(err)
	}
	revoked := s.Issue(t, TenantAcme, CredWialon, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := credentialsv1.NewSessionServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme})).
		RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: revoked.GetHandle()}); err != nil {
		t.Fatal(err)
	}
	expired := s.Issue(t, TenantAcme, CredWialon, time.Second)
	readOnly := s.Issue(t, TenantAcme, CredWialon, 0)
	time.Sleep(time.Until(expired.GetExpireTime().AsTime()) + 50*time.Millisecond) // a clock, not a signal

	client := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/anyone/sa/caller"}))
	cases := []struct {
		name, auth string
		only       string // one method only
		want       codes.Code
	}{
		{"no handle", "", "", codes.Unauthenticated},
		{"malformed handle", "Bearer fbs_not-a-handle", "", codes.Unauthenticated},
		{"two handles", "", "", codes.Unauthenticated},
		{"forged handle", "Bearer " + forged, "", codes.Unauthenticated},
		{"revoked handle", "Bearer " + revoked.GetHandle(), "", codes.Unauthenticated},
		{"expired handle", "Bearer " + expired.GetHandle(), "", codes.Unauthenticated},
		{"read-only handle on the raw pass-through", "Bearer " + readOnly.GetHandle(), telematicsv1.TelematicsService_CallProvider_FullMethodName, codes.PermissionDenied},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, rpc := range gatewayRPCs() {
				if tc.only != "" && rpc.method != tc.only {
					continue
				}
				id := newRequestID(t)
				md := metadata.Pairs(requestid.Header, id)
				switch {
				case tc.name == "two handles":
					md.Append("authorization", "Bearer "+readOnly.GetHandle(), "Bearer "+forged)
				case tc.auth != "":
					md.Append("authorization", tc.auth)
				}
				ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), md), 10*time.Second)
				err := rpc.call(ctx, client)
				cancel()
				if status.Code(err) != tc.want {
					t.Errorf("%s: %v, want %v", rpc.method, err, tc.want)
					continue
				}
				for _, h := range []string{forged, revoked.GetHandle(), expired.GetHandle(), readOnly.GetHandle()} {
					if strings.Contains(err.Error(), h) {
						t.Errorf("%s: the error repeats a handle", rpc.method)
					}
				}
				assertOutcome(t, s.GatewayAudit, id, rpc.method, audit.ResultDenied)
			}
		})
	}
	s.AssertNoLeak(t, simulator.DemoWialonToken, forged, revoked.GetHandle(), expired.GetHandle(), readOnly.GetHandle())
}

// assertOutcome finds the outcome record of the call with request id id.
func assertOutcome(t *testing.T, auditFile, id, method, result string) audit.Event {
	t.Helper()
	for _, ev := range ReadAudit(t, auditFile) {
		if ev.RequestID == id && ev.Phase == audit.PhaseOutcome {
			if ev.Result != result || ev.Method != method {
				t.Errorf("%s: audit outcome %+v, want %s", method, ev, result)
			}
			return ev
		}
	}
	t.Errorf("%s: no audit outcome of call %s", method, id)
	return audit.Event{}
}

func historyRequest() *telematicsv1.GetPositionHistoryRequest {
	now := time.Now()
	return &telematicsv1.GetPositionHistoryRequest{UnitId: "10001", StartTime: ts(now.Add(-time.Hour)), EndTime: ts(now)}
}

func tripsRequest() *telematicsv1.ListTripsRequest {
	now := time.Now()
	return &telematicsv1.ListTripsRequest{UnitId: "10001", StartTime: ts(now.Add(-time.Hour)), EndTime: ts(now)}
}

func ts(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }
