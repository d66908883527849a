package credentials_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// sessionKey is where the store keeps the session of handle h.
func (h *harness) sessionKey(handleString string) string {
	sum := sha256.Sum256([]byte(handleString))
	return h.prefix + ":sess:" + hex.EncodeToString(sum[:])
}

// editSession rewrites the stored session record of handle as a Redis
// writer would, keeping its TTL.
func (h *harness) editSession(t *testing.T, handleString string, edit func(map[string]any)) {
	t.Helper()
	ctx := context.Background()
	key := h.sessionKey(handleString)
	raw, err := h.rdb.Get(ctx, key).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatal(err)
	}
	edit(rec)
	raw, err = json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.rdb.Set(ctx, key, raw, 0).Err(); err != nil { // no TTL: the test ends first
		t.Fatal(err)
	}
}

// TestIssuedHandlesAreKeyed: handles carry a MAC under the handle key, and
// one that does not is refused before the store is asked.
func TestIssuedHandlesAreKeyed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := h.keys.Check(issued.GetHandle())
		if err != nil || c.Legacy || len(issued.GetHandle()) != handle.KeyedLength {
			t.Fatalf("issued handle: Check = %+v, %v; want a keyed handle", c, err)
		}
		other, err := handle.GenerateKeys()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := other.Check(issued.GetHandle()); err == nil {
			t.Fatal("a handle checks under a key that did not sign it")
		}

		// A forged handle of the right shape, its session even planted in
		// Redis by someone who can write there: still refused.
		forged, _, err := other.New()
		if err != nil {
			t.Fatal(err)
		}
		s := plantedSession(forged, "acme", "w", []string{"read", "raw"})
		if _, err := h.store.CreateSession(ctx, s, store.Request{}); err != nil {
			t.Fatal(err)
		}
		_, err = h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: forged})
		wantCode(t, err, codes.Unauthenticated)
		_, err = h.sessions.RevokeSession(ctx, &credentialsv1.RevokeSessionRequest{Handle: forged})
		wantCode(t, err, codes.InvalidArgument)
	})
}

func plantedSession(h, tenant, credential string, scopes []string) store.Session {
	now := time.Now()
	return store.Session{HandleHash: sha256.Sum256([]byte(h)), SessionID: "ses_planted", TenantID: tenant, CredentialID: credential,
		Scopes: scopes, CreateTime: now, ExpireTime: now.Add(time.Hour)}
}

// TestEditedSessionRecordsAreRefused is the attacker with write access to
// Redis and a handle of their own: widening its scopes, pointing it at
// another credential or tenant, extending it, or stripping its binding
// makes it stop working instead of granting more.
func TestEditedSessionRecordsAreRefused(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		for _, c := range []struct{ tenant, id string }{{"acme", "mine"}, {"acme", "victim"}, {"other", "victim"}} {
			if _, err := h.creds.PutCredential(ctx, h.wialonPut(c.tenant, c.id)); err != nil {
				t.Fatal(err)
			}
		}
		for _, tt := range []struct {
			name string
			edit func(map[string]any)
		}{
			{"scopes widened", func(r map[string]any) { r["scopes"] = []string{"read", "raw"} }},
			{"another credential", func(r map[string]any) { r["credential_id"] = "victim" }},
			{"another tenant", func(r map[string]any) { r["tenant_id"] = "other"; r["credential_id"] = "victim" }},
			{"lifetime extended", func(r map[string]any) {
				r["expire_time"] = time.Now().Add(24 * time.Hour).UTC().Format(time.RFC3339Nano)
			}},
			{"binding removed", func(r map[string]any) { delete(r, "binding") }},
		} {
			t.Run(tt.name, func(t *testing.T) {
				issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "mine"})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()}); err != nil {
					t.Fatalf("unedited session: %v", err)
				}
				h.editSession(t, issued.GetHandle(), tt.edit)
				_, err = h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: issued.GetHandle()})
				wantCode(t, err, codes.Unauthenticated)
				err = h.openSecret(ctx, issued.GetHandle())
				wantCode(t, err, codes.Unauthenticated)
				if strings.Contains(h.logs.String(), issued.GetHandle()) {
					t.Fatal("the handle appears in the logs")
				}
			})
		}
	})
}

// TestLegacyHandlesUntilTheWindowCloses: a session issued before the
// upgrade (CRC32 handle, no binding) keeps working while the legacy window
// is open; once it closes, such handles are refused before the store is
// read, so a forged CRC32 handle does not stay free forever.
func TestLegacyHandlesUntilTheWindowCloses(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // the session must be younger than its credential
		old, _, err := handle.NewLegacy()
		if err != nil {
			t.Fatal(err)
		}
		// Issued by the previous release: no binding.
		if _, err := h.store.CreateSession(ctx, plantedSession(old, "acme", "w", []string{"read"}), store.Request{}); err != nil {
			t.Fatal(err)
		}
		res, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: old})
		if err != nil || res.GetCredentialId() != "w" {
			t.Fatalf("pre-upgrade handle inside the window: %v, %v", res, err)
		}

		// The window closes (the first keyed issuer set this; here an
		// operator closes it at once), seen by a new replica.
		if err := h.rdb.Set(ctx, h.prefix+":handles:legacy-until", "0", 0).Err(); err != nil {
			t.Fatal(err)
		}
		fresh, commands := h.replica(t, harnessOptions{})
		_, err = fresh.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: old})
		wantCode(t, err, codes.Unauthenticated)
		if n := commands(); n > 1 {
			t.Errorf("refusing a legacy handle after the window cost %d Redis commands, want only the window's own read", n)
		}
	})
}

// TestFirstKeyedIssueClosesTheLegacyWindow: the window for CRC32 handles
// starts closing when this release issues its first keyed handle (not when
// it merely starts, nor while it still issues legacy handles), and closes
// once every handle of the previous release can have expired: the longest
// session plus an hour for the rest of the rollout.
func TestFirstKeyedIssueClosesTheLegacyWindow(t *testing.T) {
	h := newHarnessWith(t, backends()[1], harnessOptions{writeLegacy: true})
	ctx := context.Background()
	key := h.prefix + ":handles:legacy-until"
	if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
		t.Fatal(err)
	}
	legacy, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"})
	if err != nil {
		t.Fatal(err)
	}
	if len(legacy.GetHandle()) != handle.LegacyLength {
		t.Fatalf("under --write-legacy-formats the handle has %d characters, want a CRC32 handle", len(legacy.GetHandle()))
	}
	if n := h.rdb.Exists(ctx, key).Val(); n != 0 {
		t.Fatal("a replica issuing legacy handles closed the legacy window")
	}

	keyed, _ := h.replica(t, harnessOptions{})
	if n := h.rdb.Exists(ctx, key).Val(); n != 0 {
		t.Fatal("starting a replica closed the legacy window before it issued anything")
	}
	before := time.Now()
	if _, err := keyed.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"}); err != nil {
		t.Fatal(err)
	}
	ms, err := h.rdb.Get(ctx, key).Int64()
	if err != nil {
		t.Fatal(err)
	}
	until := time.UnixMilli(ms)
	if lo, hi := before.Add(2*time.Hour-time.Second), time.Now().Add(2*time.Hour+time.Second); until.Before(lo) || until.After(hi) {
		t.Fatalf("legacy handles accepted until %v, want max-session-ttl (1h) + 1h from the first keyed issue", until)
	}
	// Inside the window the legacy handle still works, at either replica.
	for _, r := range []*harness{h, keyed} {
		if _, err := r.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: legacy.GetHandle()}); err != nil {
			t.Fatalf("legacy handle inside the window: %v", err)
		}
	}
}
