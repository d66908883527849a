package credentials_test

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
)

// issueResolved issues a handle for tenant/id and resolves it.
func (h *harness) issueResolved(t *testing.T, tenant, id string) (string, *credentialsv1.ResolveSessionResponse) {
	t.Helper()
	ctx := context.Background()
	issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: tenant, CredentialId: id})
	if err != nil {
		t.Fatal(err)
	}
	res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
	if err != nil {
		t.Fatal(err)
	}
	return issued.GetHandle(), res
}

// TestMintUpstreamSessionKeepsCustody: the gateway gets an upstream session
// and never the long-lived secret it was opened with.
func TestMintUpstreamSessionKeepsCustody(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		for _, put := range []*credentialsv1.PutCredentialRequest{h.wialonPut("acme", "w"), h.fleetupPut("acme", "f")} {
			if _, err := h.creds.PutCredential(ctx, put); err != nil {
				t.Fatal(err)
			}
		}
		before := h.sim.Stats()

		handle, res := h.issueResolved(t, "acme", "w")
		minted, err := h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
		if err != nil {
			t.Fatal(err)
		}
		var ws credentialsv1.WialonUpstreamSession
		if err := minted.GetUpstreamSession().UnmarshalTo(&ws); err != nil || ws.GetEid() == "" {
			t.Fatalf("no Wialon session in %v: %v", minted, err)
		}
		if minted.GetCredentialGeneration() != res.GetCredentialGeneration() || minted.GetBaseUrl() != h.simURL ||
			minted.GetCredentialVersion() != 1 || minted.GetExpireTime() != nil {
			t.Fatalf("Wialon mint reply %v does not describe the credential it was asked for", minted)
		}
		assertNoLongLivedSecret(t, minted)

		handle, res = h.issueResolved(t, "acme", "f")
		if res.GetUpstreamAccount() != "4242" {
			t.Fatalf("ResolveSession upstream_account = %q, want the FleetUp account 4242", res.GetUpstreamAccount())
		}
		minted, err = h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
		if err != nil {
			t.Fatal(err)
		}
		var fs credentialsv1.FleetUpUpstreamSession
		if err := minted.GetUpstreamSession().UnmarshalTo(&fs); err != nil || !strings.HasPrefix(fs.GetJwt(), "eyJ") {
			t.Fatalf("no FleetUp JWT in the mint reply: %v", err)
		}
		// The API key travels by FleetUp's design (the residual risk in
		// docs/security.md); the account secret does not.
		if fs.GetApiKey() != "canary-api-key" || fs.GetAccountId() != 4242 || minted.GetExpireTime() == nil {
			t.Fatal("the FleetUp session lacks its API key, account or expiry")
		}
		assertNoLongLivedSecret(t, minted)

		after := h.sim.Stats()
		if after.WialonLogins != before.WialonLogins+1 || after.FleetUpMints != before.FleetUpMints+1 {
			t.Fatalf("one mint each should log in once upstream: %+v → %+v", before, after)
		}
		h.assertNoCanary(t)
	})
}

func assertNoLongLivedSecret(t *testing.T, m proto.Message) {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, canary := range []string{canaryToken, canaryFleetUpSecret} {
		if strings.Contains(string(b), canary) {
			t.Fatalf("a long-lived secret (%.8s…) left the credentials service in %T", canary, m)
		}
	}
}

// TestMintUpstreamSessionOnlyFromTheAskedGeneration: a session is minted
// from exactly the generation the gateway resolved, so it is never cached
// under the wrong one.
func TestMintUpstreamSessionOnlyFromTheAskedGeneration(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		handle, res := h.issueResolved(t, "acme", "w")
		// Rotation: same id, new secret, new generation; the handle lives on.
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		logins := h.sim.Stats().WialonLogins
		_, err := h.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()})
		st := wantCode(t, err, codes.Aborted)
		if apierr.Reason(st.Err()) != apierr.ReasonCredentialChanged {
			t.Fatalf("reason %q, want %s", apierr.Reason(st.Err()), apierr.ReasonCredentialChanged)
		}
		if h.sim.Stats().WialonLogins != logins {
			t.Fatal("a mint for a stale generation logged in upstream")
		}
	})
}

// TestMintUpstreamSessionRecordsRejection: a login the provider refuses
// marks the credential rejected, and no further login is tried with it.
func TestMintUpstreamSessionRecordsRejection(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.fleetupPut("acme", "f")); err != nil {
			t.Fatal(err)
		}
		handle, res := h.issueResolved(t, "acme", "f")
		h.sim.AddFleetUpAccount("canary-api-key", 4242, "rotated-elsewhere")
		req := &credentialsv1.MintUpstreamSessionRequest{Handle: handle, CredentialGeneration: res.GetCredentialGeneration()}
		_, err := h.sessions.MintUpstreamSession(ctx, req)
		if st := wantCode(t, err, codes.FailedPrecondition); apierr.Reason(st.Err()) != apierr.ReasonCredentialRejected {
			t.Fatalf("reason %q, want %s", apierr.Reason(st.Err()), apierr.ReasonCredentialRejected)
		}
		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "f"})
		if err != nil || got.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_REJECTED {
			t.Fatalf("credential after a rejected login: %v, %v; want REJECTED", got.GetCredential(), err)
		}
		mints := h.sim.Stats().FleetUpMints
		_, err = h.sessions.MintUpstreamSession(ctx, req)
		wantCode(t, err, codes.FailedPrecondition)
		if h.sim.Stats().FleetUpMints != mints {
			t.Fatal("a credential known to be rejected was tried upstream again")
		}
		h.assertNoCanary(t, err)
	})
}

// TestResolveSecretIsRetired: the RPC that handed out long-lived secrets
// answers UNIMPLEMENTED unless the rolling-upgrade window is opened.
func TestResolveSecretIsRetired(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		t.Run(map[bool]string{false: "default", true: "legacy-resolve-secret"}[legacy], func(t *testing.T) {
			h := newHarness(t, backends()[1], func(cfg *app.CredentialsConfig) { cfg.LegacyResolveSecret = legacy })
			ctx := context.Background()
			if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
				t.Fatal(err)
			}
			handle, _ := h.issueResolved(t, "acme", "w")
			sec, err := h.sessions.ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: handle}) //nolint:staticcheck // the retired RPC under test
			if !legacy {
				if st := wantCode(t, err, codes.Unimplemented); apierr.Reason(st.Err()) != apierr.ReasonRetired {
					t.Fatalf("reason %q, want %s", apierr.Reason(st.Err()), apierr.ReasonRetired)
				}
				return
			}
			if err != nil || sec.GetWialon().GetToken() != canaryToken || sec.GetWialon().GetBaseUrl() != h.simURL {
				t.Fatalf("with the compatibility window open, ResolveSecret = %v", err)
			}
		})
	}
}

// TestListRetiredGenerations: a generation is retired once its credential
// is replaced or deleted.
func TestListRetiredGenerations(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		put := func(id string) string {
			t.Helper()
			if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", id)); err != nil {
				t.Fatal(err)
			}
			_, res := h.issueResolved(t, "acme", id)
			return res.GetCredentialGeneration()
		}
		w1, kept := put("w"), put("kept")
		w2 := put("w") // rotated
		ask := func() map[string]bool {
			t.Helper()
			resp, err := h.sessions.ListRetiredGenerations(ctx, &credentialsv1.ListRetiredGenerationsRequest{TenantId: "acme",
				Generations: []*credentialsv1.CredentialGeneration{
					{CredentialId: "w", Generation: w1}, {CredentialId: "w", Generation: w2},
					{CredentialId: "kept", Generation: kept}, {CredentialId: "never", Generation: "g0"},
				}})
			if err != nil {
				t.Fatal(err)
			}
			out := map[string]bool{}
			for _, r := range resp.GetRetired() {
				out[r.GetCredentialId()+"/"+r.GetGeneration()] = true
			}
			return out
		}
		if got, want := ask(), map[string]bool{"w/" + w1: true, "never/g0": true}; !equalSets(got, want) {
			t.Fatalf("after a rotation: retired %v, want %v", got, want)
		}
		if _, err := h.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "w"}); err != nil {
			t.Fatal(err)
		}
		if got, want := ask(), map[string]bool{"w/" + w1: true, "w/" + w2: true, "never/g0": true}; !equalSets(got, want) {
			t.Fatalf("after a delete: retired %v, want %v", got, want)
		}
	})
}

func equalSets(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}
