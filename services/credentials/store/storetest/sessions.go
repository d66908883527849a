package storetest

import (
	"crypto/sha256"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

func testDeleteCredentialRevokesSessions(t *testing.T, h Harness) {
	ctx := testContext(t)
	doomed := mustPut(t, h, newCredential("tenant-a", "doomed"))
	other := mustPut(t, h, newCredential("tenant-a", "other"))
	live := []store.Session{mustSession(t, h, doomed, longTTL), mustSession(t, h, doomed, longTTL)}
	expired := mustSession(t, h, doomed, shortTTL)
	survivor := mustSession(t, h, other, longTTL)
	h.advance(shortTTL + expiryMargin)

	res, err := h.Store.DeleteCredential(ctx, doomed.TenantID, doomed.CredentialID, store.Request{})
	if err != nil {
		t.Fatalf("DeleteCredential: %v", err)
	}
	if res.Revoked != int64(len(live)) {
		t.Errorf("DeleteCredential revoked %d sessions, want %d (the live ones)", res.Revoked, len(live))
	}
	for _, s := range append(live, expired) {
		_, err := h.Store.GetSession(ctx, s.HandleHash)
		assertIs(t, "GetSession of revoked "+s.SessionID, err, store.ErrNotFound)
	}
	if _, err := h.Store.GetSession(ctx, survivor.HandleHash); err != nil {
		t.Errorf("session of another credential: %v", err)
	}
	// Re-creating the credential does not bring its sessions back.
	mustPut(t, h, doomed)
	for _, s := range live {
		_, err := h.Store.GetSession(ctx, s.HandleHash)
		assertIs(t, "GetSession after re-create", err, store.ErrNotFound)
	}
}

func testCreateSessionMissingCredential(t *testing.T, h Harness) {
	ctx := testContext(t)
	deleted := mustPut(t, h, newCredential("tenant-a", "deleted"))
	if _, err := h.Store.DeleteCredential(ctx, deleted.TenantID, deleted.CredentialID, store.Request{}); err != nil {
		t.Fatalf("DeleteCredential: %v", err)
	}
	for _, tc := range []struct{ name, tenant, id string }{
		{"unknown tenant", "tenant-z", "deleted"},
		{"unknown credential", "tenant-a", "never"},
		{"deleted credential", "tenant-a", "deleted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSession(store.Credential{TenantID: tc.tenant, CredentialID: tc.id}, longTTL)
			_, err := h.Store.CreateSession(ctx, s, store.Request{})
			assertIs(t, "CreateSession", err, store.ErrNotFound)
			_, err = h.Store.CreateSession(ctx, s, store.Request{ID: "req-" + tc.id, Hash: "h"})
			assertIs(t, "CreateSession with a request id", err, store.ErrNotFound)
			_, err = h.Store.GetSession(ctx, s.HandleHash)
			assertIs(t, "GetSession of refused session", err, store.ErrNotFound)
		})
	}
}

func testSessionRoundTrip(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	want := mustSession(t, h, c, longTTL)
	got, err := h.Store.GetSession(ctx, want.HandleHash)
	if err != nil {
		t.Fatalf("GetSession: %v", err)
	}
	assertSession(t, "GetSession", got, want)
}

func testSessionExpires(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	short := mustSession(t, h, c, shortTTL)
	long := mustSession(t, h, c, longTTL)
	if _, err := h.Store.GetSession(ctx, short.HandleHash); err != nil {
		t.Fatalf("GetSession before expiry: %v", err)
	}
	h.advance(shortTTL + expiryMargin)

	_, err := h.Store.GetSession(ctx, short.HandleHash)
	assertIs(t, "GetSession after expiry", err, store.ErrNotFound)
	_, err = h.Store.DeleteSession(ctx, short.HandleHash)
	assertIs(t, "DeleteSession after expiry", err, store.ErrNotFound)
	if _, err := h.Store.GetSession(ctx, long.HandleHash); err != nil {
		t.Errorf("GetSession of the long session: %v", err)
	}
	// A write after expiry still works (it prunes the expired member).
	mustSession(t, h, c, longTTL)
}

func testSessionNotFound(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	mustSession(t, h, c, longTTL)
	missing := sha256.Sum256([]byte("never issued"))
	_, err := h.Store.GetSession(ctx, missing)
	assertIs(t, "GetSession", err, store.ErrNotFound)
	_, err = h.Store.DeleteSession(ctx, missing)
	assertIs(t, "DeleteSession", err, store.ErrNotFound)
}

func testDeleteSession(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	revoked := mustSession(t, h, c, longTTL)
	kept := mustSession(t, h, c, longTTL)

	got, err := h.Store.DeleteSession(ctx, revoked.HandleHash)
	if err != nil {
		t.Fatalf("DeleteSession: %v", err)
	}
	assertSession(t, "DeleteSession", got, revoked)
	_, err = h.Store.GetSession(ctx, revoked.HandleHash)
	assertIs(t, "GetSession after DeleteSession", err, store.ErrNotFound)
	_, err = h.Store.DeleteSession(ctx, revoked.HandleHash)
	assertIs(t, "DeleteSession again", err, store.ErrNotFound)
	if _, err := h.Store.GetSession(ctx, kept.HandleHash); err != nil {
		t.Fatalf("GetSession of the other session: %v", err)
	}
	// The revoked session no longer counts against its credential.
	res, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{})
	if err != nil || res.Revoked != 1 {
		t.Errorf("DeleteCredential = %d, %v; want 1 (only the kept session), nil", res.Revoked, err)
	}
}

// testCreateSessionRejectedCredential: a credential its provider rejected
// gets no new session, with or without a request id, and nothing of the
// refused session is stored; once the credential is replaced, it does.
func testCreateSessionRejectedCredential(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, withValidation(newCredential("tenant-a", "rejected"),
		store.Validation{State: store.ValidationRejected, Message: "wialon said 8", Time: time.Now()}))
	for _, req := range []store.Request{{}, {ID: "issue-rejected", Hash: "h"}} {
		s := newSession(c, longTTL)
		_, err := h.Store.CreateSession(ctx, s, req)
		assertIs(t, "CreateSession for a rejected credential (request id "+req.ID+")", err, store.ErrRejected)
		_, err = h.Store.GetSession(ctx, s.HandleHash)
		assertIs(t, "GetSession of the refused session", err, store.ErrNotFound)
		_, _, err = h.Store.GetSessionCredential(ctx, s.HandleHash)
		assertIs(t, "GetSessionCredential of the refused session", err, store.ErrNotFound)
	}
	// Nothing was registered with the credential either.
	del, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{})
	if err != nil || del.Revoked != 0 {
		t.Errorf("DeleteCredential = %+v, %v; want no session revoked", del, err)
	}
	replaced := mustPut(t, h, newCredential("tenant-a", "rejected"))
	mustSession(t, h, replaced, longTTL)
}

// testSessionCredential: GetSessionCredential returns exactly what
// GetSession and GetCredential return, follows a replaced credential, and
// finds no session that expired, was revoked or never existed.
func testSessionCredential(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	s := mustSession(t, h, c, longTTL)
	gotS, gotC, err := h.Store.GetSessionCredential(ctx, s.HandleHash)
	if err != nil || gotC == nil {
		t.Fatalf("GetSessionCredential = %v, %v", gotC, err)
	}
	assertSession(t, "GetSessionCredential", gotS, s)
	assertCredential(t, "GetSessionCredential", *gotC, c)

	replacement := newCredential("tenant-a", "cred-1")
	replacement.BaseURL = "https://wialon.example.com"
	replaced := mustPut(t, h, replacement)
	_, gotC, err = h.Store.GetSessionCredential(ctx, s.HandleHash)
	if err != nil || gotC == nil {
		t.Fatalf("GetSessionCredential after a replace = %v, %v", gotC, err)
	}
	if gotC.Version != replaced.Version || gotC.Generation != replaced.Generation || gotC.BaseURL != replacement.BaseURL {
		t.Errorf("after a replace: version %d generation %s base %s; want %d %s %s", gotC.Version, gotC.Generation, gotC.BaseURL,
			replaced.Version, replaced.Generation, replacement.BaseURL)
	}

	short := mustSession(t, h, c, shortTTL)
	other := mustPut(t, h, newCredential("tenant-b", "cred-2"))
	revoked := mustSession(t, h, other, longTTL)
	if _, err := h.Store.DeleteSession(ctx, revoked.HandleHash); err != nil {
		t.Fatal(err)
	}
	deleted := mustSession(t, h, other, longTTL)
	if _, err := h.Store.DeleteCredential(ctx, other.TenantID, other.CredentialID, store.Request{}); err != nil {
		t.Fatal(err)
	}
	h.advance(shortTTL + expiryMargin)
	for name, hash := range map[string][32]byte{
		"expired": short.HandleHash, "revoked": revoked.HandleHash, "credential deleted": deleted.HandleHash,
		"never issued": newSession(c, longTTL).HandleHash,
	} {
		_, gotC, err := h.Store.GetSessionCredential(ctx, hash)
		assertIs(t, "GetSessionCredential of a session "+name, err, store.ErrNotFound)
		if gotC != nil {
			t.Errorf("GetSessionCredential of a session %s returned a credential", name)
		}
	}
}
