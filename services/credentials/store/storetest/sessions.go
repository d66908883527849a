package storetest

import (
	"crypto/sha256"
	"testing"

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
