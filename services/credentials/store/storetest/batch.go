package storetest

import (
	"errors"
	"fmt"
	"testing"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// testPutCredentials: PutCredentials writes each item as PutCredential
// would, with results in order; an item that fails (a stale expected
// version, an id the store refuses) writes nothing and fails alone; a
// repeated request replays its first result.
func testPutCredentials(t *testing.T, h Harness) {
	ctx := testContext(t)
	existing := mustPut(t, h, newCredential("tenant-a", "existing"))
	zero := int64(0)
	items := []store.PutItem{
		{Credential: newCredential("tenant-a", "new-1")},
		{Credential: newCredential("tenant-a", "existing"), Options: store.PutOptions{ExpectedVersion: &zero}},
		{Credential: newCredential("tenant-a", "bad:id")},
		{Credential: newCredential("tenant-a", "existing"), Options: store.PutOptions{Request: store.Request{ID: "batch~r~existing", Hash: "h1"}}},
		{Credential: newCredential("tenant-b", "new-2")},
	}
	res := h.Store.PutCredentials(ctx, items)
	if len(res) != len(items) {
		t.Fatalf("%d results for %d items", len(res), len(items))
	}
	for i, want := range []error{nil, store.ErrVersionConflict, store.ErrInvalidArgument, nil, nil} {
		if want == nil && res[i].Err != nil || want != nil && !errors.Is(res[i].Err, want) {
			t.Errorf("item %d: error %v, want %v", i, res[i].Err, want)
		}
	}
	if !res[0].Created || res[0].Credential.Version != 1 || !res[4].Created {
		t.Errorf("new items: %+v, %+v; want created at version 1", res[0].PutResult, res[4].PutResult)
	}
	if res[3].Created || res[3].Credential.Version != existing.Version+1 {
		t.Errorf("replace: %+v, want version %d", res[3].PutResult, existing.Version+1)
	}
	for i, it := range []store.PutItem{items[0], items[3], items[4]} {
		got, err := h.Store.GetCredential(ctx, it.Credential.TenantID, it.Credential.CredentialID)
		if err != nil {
			t.Fatalf("GetCredential of item %d: %v", i, err)
		}
		if got.Ciphertext != it.Credential.Ciphertext || got.Fingerprint != it.Credential.Fingerprint {
			t.Errorf("item %d stored as %+v", i, got)
		}
	}

	// Again: the request replays, the stale item still fails, the rest are
	// replaced once more.
	again := h.Store.PutCredentials(ctx, items[:4])
	if !again[3].Replayed || again[3].RequestHash != "h1" || again[3].Credential.Version != res[3].Credential.Version {
		t.Errorf("repeated request: %+v, want the first result replayed", again[3].PutResult)
	}
	if again[0].Err != nil || again[0].Credential.Version != 2 {
		t.Errorf("item without a request, put again: %+v, %v; want version 2", again[0].PutResult, again[0].Err)
	}
	if !errors.Is(again[1].Err, store.ErrVersionConflict) {
		t.Errorf("stale item again: %v", again[1].Err)
	}
	if len(h.Store.PutCredentials(ctx, nil)) != 0 {
		t.Error("no items, yet results")
	}
}

// testPutCredentialsMany: a thousand items in one call, all written.
func testPutCredentialsMany(t *testing.T, h Harness) {
	ctx := testContext(t)
	items := make([]store.PutItem, 1000)
	for i := range items {
		items[i] = store.PutItem{Credential: newCredential("tenant-a", fmt.Sprintf("c%04d", i))}
	}
	for i, r := range h.Store.PutCredentials(ctx, items) {
		if r.Err != nil || !r.Created {
			t.Fatalf("item %d: %+v", i, r)
		}
	}
	page, _, err := h.Store.ListCredentials(ctx, "tenant-a", 1000, "")
	if err != nil || len(page) != 1000 {
		t.Errorf("ListCredentials = %d credentials, %v; want 1000", len(page), err)
	}
}
