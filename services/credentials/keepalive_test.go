package credentials_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestKeepAliveLogsInWithTokensNobodyUsed: Wialon deletes a token unused
// for 100 days. A sweep logs in (and out) with every stored Wialon token
// not used within --wialon-keepalive and records last_use_time; FleetUp
// credentials, rejected ones and recently used ones are left alone; a
// token Wialon refuses is marked rejected; and of two replicas sweeping at
// once, one runs the interval's sweep.
func TestKeepAliveLogsInWithTokensNobodyUsed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		const keepAlive = 24 * time.Hour
		due := func(c *app.CredentialsConfig) { c.WialonKeepAlive = keepAlive }
		// backdate makes a credential look stored and last used two
		// intervals ago.
		backdate := func(id string) {
			t.Helper()
			old := time.Now().Add(-2 * keepAlive).UTC().Format(time.RFC3339Nano)
			if err := h.rdb.HSet(ctx, h.credKey("acme", id), "update_time", old, "last_used_time", old).Err(); err != nil {
				t.Fatal(err)
			}
		}
		a, _ := h.replica(t, harnessOptions{adjust: []func(*app.CredentialsConfig){due}})
		b, _ := h.replica(t, harnessOptions{adjust: []func(*app.CredentialsConfig){due}})

		gone := strings.Repeat("G", 72)
		h.sim.AddWialonToken(gone)
		put := func(req *credentialsv1.PutCredentialRequest) *credentialsv1.Credential {
			t.Helper()
			resp, err := a.creds.PutCredential(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			return resp.GetCredential()
		}
		put(h.wialonPut("acme", "quiet"))
		fleetup := put(h.fleetupPut("acme", "fleetup"))
		if fleetup.GetLastUseTime() == nil || !fleetup.GetLastUseTime().AsTime().Equal(fleetup.GetValidateTime().AsTime()) {
			t.Fatalf("a validated put records its login as the last use: %v / %v", fleetup.GetLastUseTime(), fleetup.GetValidateTime())
		}
		put(&credentialsv1.PutCredentialRequest{TenantId: "acme", CredentialId: "deleted-upstream",
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: gone, BaseUrl: h.simURL}}})
		h.sim.RemoveWialonToken(gone) // the customer deleted it in Wialon
		backdate("quiet")
		backdate("deleted-upstream")
		backdate("fleetup")
		busy := put(&credentialsv1.PutCredentialRequest{TenantId: "acme", CredentialId: "busy",
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: h.simURL}}})

		before := h.sim.Stats()
		var (
			wg      sync.WaitGroup
			results [2]credentials.KeepAliveResult
		)
		for i, r := range []*harness{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := r.svc.SweepKeepAlive(ctx, time.Hour)
				if err != nil {
					t.Error(err)
				}
				results[i] = res
			}()
		}
		wg.Wait()
		ran := results[0]
		if results[0].Skipped == results[1].Skipped {
			t.Fatalf("two replicas sweeping at once: skipped %v and %v, want exactly one sweep", results[0].Skipped, results[1].Skipped)
		}
		if ran.Skipped {
			ran = results[1]
		}
		if ran.Seen != 3 || ran.Kept != 1 || ran.Rejected != 1 || ran.Failed != 0 {
			t.Errorf("sweep = %+v, want 3 Wialon credentials seen, 1 kept alive, 1 rejected", ran)
		}
		after := h.sim.Stats()
		if got := after.WialonLoginsByToken[simulator.Fingerprint(canaryToken)] - before.WialonLoginsByToken[simulator.Fingerprint(canaryToken)]; got != 1 {
			t.Errorf("the sweep logged in %d times with the quiet token, want 1 (the busy credential was used just now)", got)
		}
		if after.FleetUpMints != before.FleetUpMints || after.WialonFailedLogins-before.WialonFailedLogins != 1 {
			t.Errorf("FleetUp mints %d → %d, failed Wialon logins %d → %d", before.FleetUpMints, after.FleetUpMints, before.WialonFailedLogins, after.WialonFailedLogins)
		}
		if after.ActiveWialonSessions != before.ActiveWialonSessions {
			t.Errorf("the keep-alive left sessions open: %d → %d", before.ActiveWialonSessions, after.ActiveWialonSessions)
		}
		get := func(id string) *credentialsv1.Credential {
			t.Helper()
			resp, err := a.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: id})
			if err != nil {
				t.Fatal(err)
			}
			return resp.GetCredential()
		}
		if got := get("quiet").GetLastUseTime().AsTime(); time.Since(got) > time.Minute {
			t.Errorf("the quiet credential's last use stayed %v", got)
		}
		if got := get("busy").GetLastUseTime().AsTime(); !got.Equal(busy.GetLastUseTime().AsTime()) {
			t.Errorf("the busy credential was logged in with again (last use %v → %v)", busy.GetLastUseTime().AsTime(), got)
		}
		if got := get("deleted-upstream").GetValidationState(); got != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED {
			t.Errorf("a token Wialon deleted is %v, want REJECTED", got)
		}
		if got := get("fleetup").GetLastUseTime().AsTime(); time.Since(got) < keepAlive {
			t.Errorf("the FleetUp credential (FleetUp deletes nothing unused) was logged in with: last use %v", got)
		}

		// The interval's lease holds: a second sweep now is skipped.
		if res, err := a.svc.SweepKeepAlive(ctx, time.Hour); err != nil || !res.Skipped {
			t.Errorf("a second sweep within the interval: %+v, %v", res, err)
		}
		h.assertNoCanary(t)
	})
}

// TestMintRecordsTheLastUse: every login the gateway asks for is a use.
func TestMintRecordsTheLastUse(t *testing.T) {
	h := newHarness(t, backends()[1])
	ctx := context.Background()
	if _, err := h.creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: "acme", CredentialId: "w", SkipValidation: true,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: h.simURL}}}); err != nil {
		t.Fatal(err)
	}
	get := func() *credentialsv1.Credential {
		t.Helper()
		resp, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetCredential()
	}
	if get().GetLastUseTime() != nil {
		t.Fatal("a credential stored without validation has a last use")
	}
	handle, resolved := h.issueResolved(t, "acme", "w")
	began := time.Now()
	if _, err := h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: resolved.GetCredentialGeneration()}); err != nil {
		t.Fatal(err)
	}
	if got := get().GetLastUseTime(); got == nil || got.AsTime().Before(began.Add(-time.Second)) {
		t.Errorf("last use after a mint: %v", got)
	}
}
