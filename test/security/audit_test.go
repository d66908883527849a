package security_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// smallDisk mounts a 1 MiB tmpfs for the test: a real file system that
// really fills up. The tests run as root (CI does); without the right to
// mount, the test fails rather than skip.
func smallDisk(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m,mode=0700"); err != nil {
		t.Fatalf("mount a 1 MiB tmpfs for the full-disk test (needs root, as CI runs): %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill writes a file on dir's file system until it is full, and returns a
// function that frees the space again.
func fill(t *testing.T, dir string) func() {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the disk: %v", err)
			}
			break
		}
	}
	// The last partial block: fill to the byte.
	for {
		if _, err := f.Write(chunk[:1]); err != nil {
			break
		}
	}
	f.Close()
	return func() {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAuditFailsClosedOnFullDisk is finding 6: with the audit file on a
// full disk PutCredential used to succeed (the record was written after the
// handler, and its failure only logged). Now the intent record must be
// durable before the handler touches Redis or Vault: the call is refused
// with UNAVAILABLE (AUDIT_UNAVAILABLE) and the credential is unchanged. The
// gateway likewise refuses, before any upstream login.
func TestAuditFailsClosedOnFullDisk(t *testing.T) {
	disk := smallDisk(t)
	s := Start(t, Options{AuditDir: disk})
	acme := s.Dial(t, s.CredsAddr, Identity{URI: PrincipalAcme})
	creds := credentialsv1.NewCredentialServiceClient(acme)
	handleResp := s.Issue(t, TenantAcme, CredFleetUp, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	before, err := creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
	if err != nil {
		t.Fatal(err)
	}
	mintsBefore := s.Sim.Stats()

	free := fill(t, disk)
	// The audit file's last, partly used block still takes a few lines, as
	// on any file system: reads go through until it is full too.
	for i := 0; ; i++ {
		_, err := creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: TenantAcme})
		if apierr.Reason(err) == apierr.ReasonAuditUnavailable {
			break
		}
		if err != nil || i == 100 {
			t.Fatalf("reading with the audit disk filling up: call %d: %v", i, err)
		}
	}
	const canary = "fullDiskCanaryWialonToken00000000000000000000000000000000000000000000001"
	put := WialonPut(TenantAcme, CredWialon, canary, s.SimURL)
	put.SkipValidation = true
	refusedID := newRequestID(t)
	_, err = creds.PutCredential(metadata.AppendToOutgoingContext(ctx, requestid.Header, refusedID), put)
	if status.Code(err) != codes.Unavailable || apierr.Reason(err) != apierr.ReasonAuditUnavailable {
		t.Fatalf("PutCredential with the audit disk full: %v, want UNAVAILABLE %s", err, apierr.ReasonAuditUnavailable)
	}
	gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"}))
	if _, err := gw.ListUnits(WithHandle(ctx, handleResp.GetHandle()), &telematicsv1.ListUnitsRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("gateway call with the audit disk full: %v, want UNAVAILABLE", err)
	}
	free()

	after, err := creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: TenantAcme, CredentialId: CredWialon})
	if err != nil {
		t.Fatal(err)
	}
	if after.GetCredential().GetVersion() != before.GetCredential().GetVersion() || after.GetCredential().GetFingerprint() != before.GetCredential().GetFingerprint() {
		t.Errorf("the refused PutCredential changed the credential: %v -> %v", before.GetCredential(), after.GetCredential())
	}
	if got := s.Sim.Stats(); got.FleetUpMints != mintsBefore.FleetUpMints {
		t.Errorf("the refused gateway call minted upstream: %d -> %d", mintsBefore.FleetUpMints, got.FleetUpMints)
	}
	// Every line on the disk is whole (ReadAudit fails on a torn one), and
	// no record claims the refused write ran.
	for _, ev := range ReadAudit(t, s.CredsAudit) {
		if ev.RequestID == refusedID && (ev.Phase == audit.PhaseIntent || ev.Result == audit.ResultOK) {
			t.Errorf("an audit record claims the refused write ran: %+v", ev)
		}
	}
	// With space again, the same write goes through.
	if _, err := creds.PutCredential(ctx, put); err != nil {
		t.Fatalf("PutCredential after the disk has space again: %v", err)
	}
	s.AssertNoLeak(t, canary, handleResp.GetHandle(), simulator.DemoFleetUpSecret)
}

// TestGatewayCallsAndLoginsAreAudited is the other half of finding 6: the
// gateway recorded nothing. Every call is now on record before it runs and
// after, with the session, tenant, credential and, for CallProvider, the
// provider and svc/path; every upstream login or token mint on behalf of a
// session too. Never a secret.
func TestGatewayCallsAndLoginsAreAudited(t *testing.T) {
	s := Start(t, Options{})
	gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"}))
	wialonRaw := s.Issue(t, TenantAcme, CredWialon, 0, credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
	fleetupRaw := s.Issue(t, TenantAcme, CredFleetUp, 0, credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
	calls := []struct {
		name, provider, target string
		h                      *credentialsv1.IssueSessionResponse
		req                    *telematicsv1.CallProviderRequest
	}{
		{"wialon", "wialon", "core/search_items", wialonRaw, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{
			Wialon: &telematicsv1.WialonCall{Svc: "core/search_items", Params: mustStruct(t, map[string]any{
				"spec":  map[string]any{"itemsType": "avl_unit", "propName": "sys_name", "propValueMask": "*", "sortType": "sys_name"},
				"force": 1, "flags": 1, "from": 0, "to": 0})}}}},
		{"fleetup", "fleetup", "POST /devices", fleetupRaw, &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Fleetup{
			Fleetup: &telematicsv1.FleetUpCall{Method: "POST", Path: "/devices", Body: mustStruct(t, map[string]any{"acctId": simulator.DemoFleetUpAccountID})}}}},
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			id := newRequestID(t)
			ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(WithHandle(context.Background(), c.h.GetHandle()), requestid.Header, id), 20*time.Second)
			defer cancel()
			if _, err := gw.CallProvider(ctx, c.req); err != nil {
				t.Fatal(err)
			}
			var intent, outcome, loginIntent, loginOutcome bool
			for _, ev := range ReadAudit(t, s.GatewayAudit) {
				if ev.RequestID != id {
					continue
				}
				if ev.SessionID != c.h.GetSessionId() && ev.Phase == audit.PhaseOutcome {
					t.Errorf("record without the session: %+v", ev)
				}
				switch {
				case ev.Action == authz.ActionSession && ev.Phase == audit.PhaseIntent:
					intent = true
				case ev.Action == authz.ActionSession && ev.Phase == audit.PhaseOutcome:
					outcome = true
					want := audit.Event{Phase: audit.PhaseOutcome, RequestID: id, Principal: "spiffe://example.org/ns/acme/sa/dashboard", Via: "uri-san",
						Method: telematicsv1.TelematicsService_CallProvider_FullMethodName, Action: authz.ActionSession, TenantID: TenantAcme,
						CredentialID: c.h.GetSessionId(), SessionID: c.h.GetSessionId(), Provider: c.provider, Target: c.target, Result: audit.ResultOK, Code: "OK"}
					want.CredentialID = map[string]string{"wialon": CredWialon, "fleetup": CredFleetUp}[c.name]
					got := ev
					got.Time, got.Peer = time.Time{}, ""
					if got != want {
						t.Errorf("outcome record\n got %+v\nwant %+v", got, want)
					}
				case ev.Action == authz.ActionUpstreamLogin && ev.Phase == audit.PhaseIntent:
					loginIntent = true
				case ev.Action == authz.ActionUpstreamLogin && ev.Phase == audit.PhaseOutcome:
					loginOutcome = ev.Result == audit.ResultOK && ev.Provider == c.provider && ev.TenantID == TenantAcme
				}
			}
			if !intent || !outcome || !loginIntent || !loginOutcome {
				t.Errorf("records: intent %v, outcome %v, login intent %v, login outcome %v; want all", intent, outcome, loginIntent, loginOutcome)
			}
		})
	}
	raw, err := os.ReadFile(s.GatewayAudit)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), "acctId") {
		t.Error("a request body reached the audit trail")
	}
	s.AssertNoLeak(t, simulator.DemoWialonToken, simulator.DemoFleetUpSecret, simulator.DemoFleetUpAPIKey, wialonRaw.GetHandle(), fleetupRaw.GetHandle())
}

func mustStruct(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestWatchLoginIsAudited: a WatchPositions stream's shared poll runs
// outside the call, and its upstream login is still on record, in the
// name of the stream that started it.
func TestWatchLoginIsAudited(t *testing.T) {
	s := Start(t, Options{})
	h := s.Issue(t, TenantAcme, CredWialon, 0)
	gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"}))
	id := newRequestID(t)
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(WithHandle(context.Background(), h.GetHandle()), requestid.Header, id), 20*time.Second)
	defer cancel()
	st, err := gw.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	var intent, outcome bool
	for _, ev := range ReadAudit(t, s.GatewayAudit) {
		if ev.Action != authz.ActionUpstreamLogin {
			continue
		}
		if ev.RequestID != id || ev.SessionID != h.GetSessionId() || ev.TenantID != TenantAcme || ev.CredentialID != CredWialon || ev.Provider != "wialon" {
			t.Errorf("login record not in the stream's name: %+v", ev)
		}
		intent = intent || ev.Phase == audit.PhaseIntent
		outcome = outcome || (ev.Phase == audit.PhaseOutcome && ev.Result == audit.ResultOK)
	}
	if !intent || !outcome {
		t.Errorf("the poll's upstream login: intent %v, outcome %v; want both", intent, outcome)
	}
	s.AssertNoLeak(t, simulator.DemoWialonToken, h.GetHandle())
}
