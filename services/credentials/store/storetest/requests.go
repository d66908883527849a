package storetest

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// testPutRequestReplays: a second run of a request id writes nothing and
// returns the first result, however the request or the record has changed
// since; another id is another write.
func testPutRequestReplays(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := newCredential("tenant-a", "cred-1")
	req := store.Request{ID: "0b6d3f4e-put", Hash: "hash-of-first"}
	first, err := h.Store.PutCredential(ctx, c, store.PutOptions{Request: req})
	if err != nil || !first.Created || first.Replayed || first.Credential.Version != 1 {
		t.Fatalf("first put = %+v, %v; want created at version 1", first, err)
	}

	retry := c
	retry.Ciphertext = "vault:v1:a-retry-encrypts-again"
	retry.Generation = "g-retry"
	got, err := h.Store.PutCredential(ctx, retry, store.PutOptions{Request: store.Request{ID: req.ID, Hash: "hash-of-retry"}})
	if err != nil {
		t.Fatalf("replayed put: %v", err)
	}
	if !got.Replayed || got.RequestHash != req.Hash || !got.Created {
		t.Fatalf("replayed put = replayed %v, hash %q, created %v; want replayed, %q, created", got.Replayed, got.RequestHash, got.Created, req.Hash)
	}
	want := first.Credential
	want.Ciphertext = "" // a replay answers with metadata only
	assertCredential(t, "replayed put", got.Credential, want)
	assertUnchanged(t, h, first.Credential)

	// Another request is another write, and the first id keeps its answer
	// even after the credential changed or went.
	if next := mustPut(t, h, c); next.Version != 2 {
		t.Fatalf("put under another id: version %d, want 2", next.Version)
	}
	if _, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{}); err != nil {
		t.Fatal(err)
	}
	late, err := h.Store.PutCredential(ctx, c, store.PutOptions{Request: req})
	if err != nil || !late.Replayed || late.Credential.Version != 1 {
		t.Fatalf("put replayed after delete = %+v, %v; want the first result", late, err)
	}
	_, err = h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
	assertIs(t, "GetCredential after a replay of a deleted credential's put", err, store.ErrNotFound)
}

func testPutExpectedVersion(t *testing.T, h Harness) {
	ver := func(v int64) *int64 { return &v }
	for _, tc := range []struct {
		name     string
		existing int // puts before
		expected *int64
		wantErr  error
		wantVer  int64
	}{
		{"absent, must be absent", 0, ver(0), nil, 1},
		{"present, must be absent", 1, ver(0), store.ErrVersionConflict, 1},
		{"at the expected version", 2, ver(2), nil, 3},
		{"behind the expected version", 2, ver(1), store.ErrVersionConflict, 2},
		{"ahead of the stored version", 1, ver(5), store.ErrVersionConflict, 1},
		{"absent, expects a version", 0, ver(1), store.ErrVersionConflict, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			c := newCredential("tenant-a", "cred-"+strings.ReplaceAll(tc.name, " ", "-"))
			var before store.Credential
			for range tc.existing {
				before = mustPut(t, h, c)
			}
			c.Ciphertext = "vault:v1:conditional"
			res, err := h.Store.PutCredential(ctx, c, store.PutOptions{ExpectedVersion: tc.expected})
			if tc.wantErr != nil {
				assertIs(t, "PutCredential", err, tc.wantErr)
				if tc.existing > 0 {
					assertUnchanged(t, h, before)
				} else {
					_, err := h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
					assertIs(t, "GetCredential after a refused create", err, store.ErrNotFound)
				}
				return
			}
			if err != nil || res.Credential.Version != tc.wantVer || res.Credential.Ciphertext != c.Ciphertext {
				t.Fatalf("PutCredential = version %d, %v; want %d", res.Credential.Version, err, tc.wantVer)
			}
		})
	}

	// A retry of a conditional put that was applied replays its result,
	// though its condition no longer holds.
	ctx := testContext(t)
	c := newCredential("tenant-a", "retried")
	opts := store.PutOptions{Request: store.Request{ID: "conditional", Hash: "h"}, ExpectedVersion: ver(0)}
	if _, err := h.Store.PutCredential(ctx, c, opts); err != nil {
		t.Fatal(err)
	}
	res, err := h.Store.PutCredential(ctx, c, opts)
	if err != nil || !res.Replayed || res.Credential.Version != 1 {
		t.Fatalf("retried conditional put = %+v, %v; want the first result", res, err)
	}
}

// testConcurrentPutOneRequest: the same request sent many times at once is
// applied once, and every sender gets that one result.
func testConcurrentPutOneRequest(t *testing.T, h Harness) {
	const n = 20
	ctx := testContext(t)
	c := newCredential("tenant-a", "contended")
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		replays  int
		versions = map[int64]int{}
	)
	for i := range n {
		wg.Go(func() {
			c := c
			c.Ciphertext = fmt.Sprintf("vault:v1:sender-%d", i)
			res, err := h.Store.PutCredential(ctx, c, store.PutOptions{Request: store.Request{ID: "same-request", Hash: "h"}})
			if err != nil {
				t.Errorf("PutCredential: %v", err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			versions[res.Credential.Version]++
			if res.Replayed {
				replays++
			}
			if !res.Created {
				t.Errorf("a sender was told created=false: %+v", res)
			}
		})
	}
	wg.Wait()
	if replays != n-1 || versions[1] != n {
		t.Errorf("%d replays and versions %v; want %d replays, all version 1", replays, versions, n-1)
	}
	got, err := h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
	if err != nil || got.Version != 1 {
		t.Errorf("GetCredential = version %d, %v; want 1", got.Version, err)
	}
}

// testDeleteRequestReplays: a repeated delete answers as the first did, not
// NOT_FOUND, and the count of revoked sessions is the first one.
func testDeleteRequestReplays(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "doomed"))
	mustSession(t, h, c, longTTL)
	mustSession(t, h, c, longTTL)
	req := store.Request{ID: "delete-1", Hash: "h-delete"}
	first, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, req)
	if err != nil || first.Revoked != 2 || first.Replayed {
		t.Fatalf("DeleteCredential = %+v, %v; want 2 revoked", first, err)
	}
	again, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{ID: req.ID, Hash: "h-other"})
	if err != nil || !again.Replayed || again.Revoked != 2 || again.RequestHash != req.Hash {
		t.Fatalf("replayed DeleteCredential = %+v, %v; want the first result (2 revoked, hash %q)", again, err, req.Hash)
	}
	// A replay deletes nothing: a credential created since stays.
	recreated := mustPut(t, h, c)
	if _, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, req); err != nil {
		t.Fatal(err)
	}
	assertUnchanged(t, h, recreated)
	_, err = h.Store.DeleteCredential(ctx, "tenant-a", "never-was", store.Request{ID: "delete-2"})
	assertIs(t, "DeleteCredential of a missing credential", err, store.ErrNotFound)
}

// testCreateSessionRequestReplays: a repeated issue returns the first
// session and memo, stores nothing new, and never brings back a session
// revoked since.
func testCreateSessionRequestReplays(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	first := newSession(c, longTTL)
	req := store.Request{ID: "issue-1", Hash: "h-issue", Memo: "memo-of-first"}
	res, err := h.Store.CreateSession(ctx, first, req)
	if err != nil || res.Replayed || res.Memo != req.Memo {
		t.Fatalf("CreateSession = %+v, %v", res, err)
	}
	assertSession(t, "CreateSession", res.Session, first)

	retry := newSession(c, longTTL) // a retry makes a new handle, which must not be stored
	res, err = h.Store.CreateSession(ctx, retry, store.Request{ID: req.ID, Hash: "h-retry", Memo: "memo-of-retry"})
	if err != nil || !res.Replayed || res.Memo != req.Memo || res.RequestHash != req.Hash {
		t.Fatalf("replayed CreateSession = %+v, %v; want the first memo and hash", res, err)
	}
	assertSession(t, "replayed CreateSession", res.Session, first)
	_, err = h.Store.GetSession(ctx, retry.HandleHash)
	assertIs(t, "GetSession of the retry's handle", err, store.ErrNotFound)
	if got, err := h.Store.GetSession(ctx, first.HandleHash); err != nil {
		t.Fatalf("GetSession of the first: %v", err)
	} else {
		assertSession(t, "GetSession of the first", got, first)
	}

	if _, err := h.Store.DeleteSession(ctx, first.HandleHash); err != nil {
		t.Fatal(err)
	}
	res, err = h.Store.CreateSession(ctx, retry, req)
	if err != nil || !res.Replayed {
		t.Fatalf("CreateSession replayed after revoke = %+v, %v", res, err)
	}
	_, err = h.Store.GetSession(ctx, first.HandleHash)
	assertIs(t, "GetSession of a revoked session after a replay", err, store.ErrNotFound)
	// Only the one (revoked) session was ever registered.
	del, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{})
	if err != nil || del.Revoked != 0 {
		t.Errorf("DeleteCredential = %+v, %v; want 0 live sessions", del, err)
	}
}

func testRequestIDsPerTenantAndOperation(t *testing.T, h Harness) {
	ctx := testContext(t)
	req := store.Request{ID: "shared-id", Hash: "h"}
	for _, tenant := range []string{"tenant-a", "tenant-b"} {
		res, err := h.Store.PutCredential(ctx, newCredential(tenant, "cred-1"), store.PutOptions{Request: req})
		if err != nil || res.Replayed {
			t.Fatalf("put in %s = %+v, %v; want a fresh write", tenant, res, err)
		}
	}
	// The same id names a different request of another operation.
	res, err := h.Store.DeleteCredential(ctx, "tenant-a", "cred-1", req)
	if err != nil || res.Replayed {
		t.Fatalf("delete under a put's id = %+v, %v; want a fresh delete", res, err)
	}
	if _, err := h.Store.GetCredential(ctx, "tenant-b", "cred-1"); err != nil {
		t.Fatalf("the other tenant's credential: %v", err)
	}
}

func testInvalidRequestID(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	for _, id := range []string{"a:b", "{tag}", "x}"} {
		_, err := h.Store.PutCredential(ctx, c, store.PutOptions{Request: store.Request{ID: id}})
		assertIs(t, "PutCredential", err, store.ErrInvalidArgument)
		_, err = h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{ID: id})
		assertIs(t, "DeleteCredential", err, store.ErrInvalidArgument)
		_, err = h.Store.CreateSession(ctx, newSession(c, longTTL), store.Request{ID: id})
		if !errors.Is(err, store.ErrInvalidArgument) {
			t.Errorf("CreateSession with request id %q: %v, want ErrInvalidArgument", id, err)
		}
	}
	assertUnchanged(t, h, c)
}
