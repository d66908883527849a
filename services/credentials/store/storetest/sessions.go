package storetest

import (
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

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
