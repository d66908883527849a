package app_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// Canaries for the custody test: long-lived secrets the credentials service
// must never hand to anyone, the gateway included.
const (
	custodyWialonToken   = "CustodyCanaryWialon0123456789abcdefCustodyCanaryWialon0123456789abcdefCC"
	custodyFleetUpKey    = "custody-canary-api-key-41d2"
	custodyFleetUpSecret = "custody-canary-account-secret-8e07"
	custodyFleetUpAcct   = int64(880011)
)

// TestGatewayIdentityNeverReceivesALongLivedSecret is the attacker's test
// of custody: someone holding the gateway's certificate calls every RPC of
// the credentials service — enumerated from the contract, so an RPC added
// later is called too — for a Wialon and a FleetUp credential, and no
// reply or error may carry the Wialon token or the FleetUp account secret.
// (The FleetUp API key does reach the gateway, inside MintUpstreamSession's
// reply, because FleetUp needs it on every call: docs/security.md.)
func TestGatewayIdentityNeverReceivesALongLivedSecret(t *testing.T) {
	st := startSecureStack(t, 0)
	st.sim.AddWialonToken(custodyWialonToken)
	st.sim.AddFleetUpAccount(custodyFleetUpKey, custodyFleetUpAcct, custodyFleetUpSecret)
	ctx := context.Background()
	acme := st.dial(t, st.credsAddr, st.pki, principalAcme)
	acmeCreds, acmeSessions := credentialsv1.NewCredentialServiceClient(acme), credentialsv1.NewSessionServiceClient(acme)
	for _, req := range []*credentialsv1.PutCredentialRequest{
		{TenantId: secTenantA, CredentialId: "w", Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: custodyWialonToken, BaseUrl: st.simURL}}},
		{TenantId: secTenantA, CredentialId: "f", Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
			ApiKey: custodyFleetUpKey, AccountId: custodyFleetUpAcct, Secret: custodyFleetUpSecret, BaseUrl: st.simURL}}},
	} {
		if _, err := acmeCreds.PutCredential(ctx, req); err != nil {
			t.Fatal(err)
		}
	}

	gateway := st.dial(t, st.credsAddr, st.pki, principalGateway)
	gwSessions := credentialsv1.NewSessionServiceClient(gateway)
	served := map[string]int{} // method → successful calls
	for _, credential := range []string{"w", "f"} {
		for _, method := range contractMethods(t) {
			// A fresh handle per call, so no call (a revocation, say) spoils the next.
			issued, err := acmeSessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: secTenantA, CredentialId: credential})
			if err != nil {
				t.Fatal(err)
			}
			res, err := gwSessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
			if err != nil {
				t.Fatal(err)
			}
			req := dynamicRequest(t, method, map[string]string{
				"tenant_id": secTenantA, "credential_id": credential, "handle": issued.GetHandle(),
				"credential_generation": res.GetCredentialGeneration(), "generation": res.GetCredentialGeneration(),
			})
			reply := newMessage(t, method.Output())
			callCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err = gateway.Invoke(callCtx, "/"+string(method.Parent().FullName())+"/"+string(method.Name()), req, reply)
			cancel()
			var seen []byte
			if err == nil {
				served[string(method.Name())]++
				if seen, err = proto.Marshal(reply); err != nil {
					t.Fatal(err)
				}
			} else if seen, err = proto.Marshal(status.Convert(err).Proto()); err != nil {
				t.Fatal(err)
			}
			for _, secret := range []string{custodyWialonToken, custodyFleetUpSecret} {
				if strings.Contains(string(seen), secret) {
					t.Errorf("%s for credential %s handed the gateway's identity a long-lived secret (%.10s…)", method.FullName(), credential, secret)
				}
			}
		}
	}
	// The scan above proves something only if the gateway's own RPCs
	// answered: resolution, minting, rejection reports, purge checks.
	for _, m := range []string{"ResolveSession", "MintUpstreamSession", "ReportRejection", "ListRetiredGenerations"} {
		if served[m] != 2 {
			t.Errorf("%s served the gateway %d of 2 times", m, served[m])
		}
	}
	if served["ResolveSecret"] != 0 {
		t.Error("the retired ResolveSecret answered without --legacy-resolve-secret")
	}

	// And end to end: the gateway serves both credentials with minted sessions.
	gw := telematicsv1.NewTelematicsServiceClient(st.dial(t, st.gatewayAddr, st.pki, principalAcme))
	for _, credential := range []string{"w", "f"} {
		issued, err := acmeSessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: secTenantA, CredentialId: credential})
		if err != nil {
			t.Fatal(err)
		}
		hctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+issued.GetHandle())
		if _, err := gw.GetLatestPositions(hctx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
			t.Fatalf("gateway on credential %s: %v", credential, err)
		}
	}
	audit, err := os.ReadFile(st.auditFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(audit), credentialsv1.SessionService_MintUpstreamSession_FullMethodName) {
		t.Error("MintUpstreamSession is not in the audit trail")
	}
	for _, secret := range []string{custodyWialonToken, custodyFleetUpSecret, custodyFleetUpKey} {
		if strings.Contains(string(audit), secret) || strings.Contains(st.logs.String(), secret) {
			t.Errorf("secret %.10s… in the audit trail or logs", secret)
		}
	}
}

// contractMethods lists every RPC of the credentials contract.
func contractMethods(t *testing.T) []protoreflect.MethodDescriptor {
	t.Helper()
	var out []protoreflect.MethodDescriptor
	services := credentialsv1.File_fleetbroker_credentials_v1_credentials_proto.Services()
	for i := range services.Len() {
		methods := services.Get(i).Methods()
		for j := range methods.Len() {
			if m := methods.Get(j); !m.IsStreamingClient() && !m.IsStreamingServer() {
				out = append(out, m)
			}
		}
	}
	if len(out) < 10 {
		t.Fatalf("only %d RPCs found in the credentials contract", len(out))
	}
	return out
}

func newMessage(t *testing.T, d protoreflect.MessageDescriptor) proto.Message {
	t.Helper()
	mt, err := protoregistry.GlobalTypes.FindMessageByName(d.FullName())
	if err != nil {
		t.Fatal(err)
	}
	return mt.New().Interface()
}

// dynamicRequest builds method's request with every string field named in
// values set, a list of messages holding one such message, and a
// credential_version of 99 (so a rejection report is stale and harmless).
func dynamicRequest(t *testing.T, method protoreflect.MethodDescriptor, values map[string]string) proto.Message {
	t.Helper()
	msg := newMessage(t, method.Input())
	fill(msg.ProtoReflect(), values)
	return msg
}

func fill(m protoreflect.Message, values map[string]string) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		f := fields.Get(i)
		switch {
		case f.Kind() == protoreflect.StringKind && !f.IsList() && !f.IsMap():
			if v, ok := values[string(f.Name())]; ok {
				m.Set(f, protoreflect.ValueOfString(v))
			}
		case f.Name() == "credential_version":
			m.Set(f, protoreflect.ValueOfInt64(99))
		case f.Kind() == protoreflect.MessageKind && f.IsList():
			elem := m.Mutable(f).List().NewElement()
			fill(elem.Message(), values)
			m.Mutable(f).List().Append(elem)
		}
	}
}
