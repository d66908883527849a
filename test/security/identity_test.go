package security_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestCollidingIdentities is finding 3: a principal's name says where it
// came from, so no certificate field can pose as another kind of identity.
// Before the fix a certificate with CN=spiffe://…/gateway and no SAN got the
// plaintext token from ResolveSecret, and one with DNS:billing-batch got
// that API key's grants. Legitimate callers of every kind still get in, and
// the audit trail names each with its prefix and source.
func TestCollidingIdentities(t *testing.T) {
	for _, cn := range []bool{false, true} {
		name := "CN principals off (default)"
		if cn {
			name = "CN principals on"
		}
		t.Run(name, func(t *testing.T) {
			s := Start(t, Options{Credentials: func(c *app.CredentialsConfig) {
				c.Security.ClientCertOptional = true // API-key callers connect without a certificate
				c.Security.ClientCNPrincipals = cn
			}})
			live := s.Issue(t, TenantAcme, CredWialon, 0)
			cnRefusal := codes.Unauthenticated // a certificate that names nobody
			if cn {
				cnRefusal = codes.PermissionDenied // cn:spiffe://… has no grant
			}
			tests := []struct {
				name      string
				id        Identity
				call      string // "secret" (ResolveSecret) or "list" (ListCredentials on acme)
				want      codes.Code
				principal string // on record, for calls that pass identification
				via       string
			}{
				{"CN spelling the gateway's SPIFFE ID asks for the secret", Identity{CN: PrincipalGateway}, "secret", cnRefusal, "cn:" + PrincipalGateway, "cn"},
				{"DNS SAN spelling the API key's name", Identity{DNS: "billing-batch"}, "list", codes.PermissionDenied, "dns:billing-batch", "dns-san"},
				{"URI SAN key:billing-batch", Identity{URI: "key:billing-batch"}, "list", codes.Unauthenticated, "", ""},
				{"the API key itself", Identity{APIKey: KeyBillingBatch}, "list", codes.OK, "key:billing-batch", "api-key"},
				{"a granted DNS SAN", Identity{DNS: DNSReporting}, "list", codes.OK, "dns:" + DNSReporting, "dns-san"},
				{"a granted CN", Identity{CN: CNLegacy}, "list", map[bool]codes.Code{false: codes.Unauthenticated, true: codes.OK}[cn], "cn:" + CNLegacy, "cn"},
				{"a granted URI SAN", Identity{URI: PrincipalAcme}, "list", codes.OK, PrincipalAcme, "uri-san"},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					conn := s.Dial(t, s.CredsAddr, tt.id)
					id := newRequestID(t)
					ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), requestid.Header, id), 10*time.Second)
					defer cancel()
					var err error
					method := credentialsv1.CredentialService_ListCredentials_FullMethodName
					if tt.call == "secret" {
						method = credentialsv1.SessionService_ResolveSecret_FullMethodName
						var resp *credentialsv1.ResolveSecretResponse
						resp, err = credentialsv1.NewSessionServiceClient(conn).ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: live.GetHandle()})
						if resp.GetWialon().GetToken() != "" {
							t.Fatal("the colliding identity got the plaintext token")
						}
					} else {
						_, err = credentialsv1.NewCredentialServiceClient(conn).ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: TenantAcme})
					}
					if got := status.Code(err); got != tt.want {
						t.Fatalf("got %v, want %v", err, tt.want)
					}
					want := audit.ResultDenied
					if tt.want == codes.OK {
						want = audit.ResultOK
					}
					ev := assertOutcome(t, s.CredsAudit, id, method, want)
					if tt.want != codes.Unauthenticated && (ev.Principal != tt.principal || ev.Via != tt.via) {
						t.Errorf("on record as %q via %q, want %q via %q", ev.Principal, ev.Via, tt.principal, tt.via)
					}
				})
			}
			// The real gateway, by its URI SAN, still resolves handles.
			gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"}))
			ctx, cancel := context.WithTimeout(WithHandle(context.Background(), live.GetHandle()), 20*time.Second)
			defer cancel()
			if _, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
				t.Fatalf("the gateway no longer works: %v", err)
			}
			s.AssertNoLeak(t, simulator.DemoWialonToken, live.GetHandle(), KeyBillingBatch)
		})
	}
}
