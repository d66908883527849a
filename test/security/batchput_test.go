package security_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestBatchPutIsAuditedItemByItem: a BatchPutCredentials call has one
// intent record naming every credential it is about to write, before it
// writes any; then one outcome record per item, with the item's credential
// id and result, as a PutCredential of it would; then the call's outcome,
// counting the failed items. No secret in any of them.
func TestBatchPutIsAuditedItemByItem(t *testing.T) {
	s := Start(t, Options{})
	creds := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme}))
	id := newRequestID(t)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), requestid.Header, id), 20*time.Second)
	defer cancel()
	const canary = "batchCanaryWialonToken00000000000000000000000000000000000000000000000001"
	resp, err := creds.BatchPutCredentials(ctx, &credentialsv1.BatchPutCredentialsRequest{TenantId: TenantAcme, SkipValidation: true, Items: []*credentialsv1.BatchPutItem{
		{CredentialId: "batch-ok", Secret: &credentialsv1.BatchPutItem_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canary, BaseUrl: s.SimURL}}},
		{CredentialId: "batch-elsewhere", Secret: &credentialsv1.BatchPutItem_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canary, BaseUrl: "https://evil.example.com"}}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetResults()[0].GetError() != nil || resp.GetResults()[1].GetError().GetReason() != apierr.ReasonInvalidArgument {
		t.Fatalf("results %v: want the first stored, the second refused", resp.GetResults())
	}
	base := audit.Event{RequestID: id, Principal: PrincipalAcme, Via: "uri-san", Method: credentialsv1.CredentialService_BatchPutCredentials_FullMethodName,
		Action: string(policy.CredentialsWrite), TenantID: TenantAcme}
	intent := base
	intent.Phase, intent.Items, intent.CredentialIDs = audit.PhaseIntent, 2, "batch-ok,batch-elsewhere"
	ok := base
	ok.Phase, ok.CredentialID, ok.Result, ok.Code = audit.PhaseOutcome, "batch-ok", audit.ResultOK, "OK"
	refused := base
	refused.Phase, refused.CredentialID, refused.Result, refused.Code, refused.Reason = audit.PhaseOutcome, "batch-elsewhere", audit.ResultError, "InvalidArgument", apierr.ReasonInvalidArgument
	call := base
	call.Phase, call.Items, call.CredentialIDs, call.ItemsFailed, call.Result, call.Code = audit.PhaseOutcome, 2, "batch-ok,batch-elsewhere", 1, audit.ResultOK, "OK"
	var got []audit.Event
	for _, ev := range ReadAudit(t, s.CredsAudit) {
		if ev.RequestID == id {
			ev.Time, ev.Peer = time.Time{}, ""
			got = append(got, ev)
		}
	}
	want := []audit.Event{intent, ok, refused, call}
	if len(got) != len(want) {
		t.Fatalf("records of the call:\n%+v\nwant\n%+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("record %d\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}
	s.AssertNoLeak(t, canary, simulator.DemoWialonToken)
}
