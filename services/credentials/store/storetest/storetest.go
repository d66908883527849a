// Package storetest is the conformance suite for store.Store: every
// implementation, and every backend an implementation runs on, must pass
// Run.
package storetest

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Harness is one empty store under test.
type Harness struct {
	Store store.Store
	// Advance moves time forward by d as the store sees it, so that
	// sessions expire: a real server just sleeps, an in-process one may
	// fast-forward. Nil means time.Sleep.
	Advance func(d time.Duration)
}

func (h Harness) advance(d time.Duration) {
	if h.Advance == nil {
		time.Sleep(d)
		return
	}
	h.Advance(d)
}

// Short session lifetimes for the expiry tests; the whole suite waits for
// shortTTL+expiryMargin at most once per test, and the tests run in parallel.
const (
	shortTTL     = 1500 * time.Millisecond
	expiryMargin = 500 * time.Millisecond
	longTTL      = time.Hour
	callTimeout  = 20 * time.Second
)

// Run runs the suite. newHarness is called once per test, in parallel tests,
// and must return a store that shares no data with any other harness.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	tests := []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"PutGetRoundTrip", testPutGetRoundTrip},
		{"PutReplace", testPutReplace},
		{"GenerationNeverRepeats", testGenerationNeverRepeats},
		{"GetMissing", testGetMissing},
		{"InvalidIDs", testInvalidIDs},
		{"ListPagination", testListPagination},
		{"ListTenantIsolation", testListTenantIsolation},
		{"ListInvalidArguments", testListInvalidArguments},
		{"DeleteCredential", testDeleteCredential},
		{"DeleteCredentialRevokesSessions", testDeleteCredentialRevokesSessions},
		{"CreateSessionMissingCredential", testCreateSessionMissingCredential},
		{"CreateSessionRejectedCredential", testCreateSessionRejectedCredential},
		{"SessionCredential", testSessionCredential},
		{"PutCredentials", testPutCredentials},
		{"PutCredentialsMany", testPutCredentialsMany},
		{"SessionRoundTrip", testSessionRoundTrip},
		{"SessionExpires", testSessionExpires},
		{"SessionNotFound", testSessionNotFound},
		{"DeleteSession", testDeleteSession},
		{"SetValidation", testSetValidation},
		{"UpdateCiphertext", testUpdateCiphertext},
		{"RecordUse", testRecordUse},
		{"ForEachCredential", testForEachCredential},
		{"ForEachCredentialStopsOnError", testForEachCredentialStopsOnError},
		{"ConcurrentPut", testConcurrentPut},
		{"CancelledContext", testCancelledContext},
		{"PutRequestReplays", testPutRequestReplays},
		{"PutExpectedVersion", testPutExpectedVersion},
		{"ConcurrentPutOneRequest", testConcurrentPutOneRequest},
		{"DeleteRequestReplays", testDeleteRequestReplays},
		{"CreateSessionRequestReplays", testCreateSessionRequestReplays},
		{"RequestIDsPerTenantAndOperation", testRequestIDsPerTenantAndOperation},
		{"InvalidRequestID", testInvalidRequestID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t, newHarness(t))
		})
	}
}

func testPutGetRoundTrip(t *testing.T, h Harness) {
	ctx := testContext(t)
	minimal := newCredential("tenant-a", "minimal")
	minimal.Labels, minimal.BaseURL, minimal.ValidateTime = nil, "", time.Time{}
	minimal.ValidationState, minimal.ValidationMessage, minimal.UpstreamUser = store.ValidationNotValidated, "", ""
	minimal.ADVersion = 0
	fleetUp := newCredential("tenant-a", "fleetup-1")
	fleetUp.Provider, fleetUp.FleetUpAccountID, fleetUp.BaseURL = store.ProviderFleetUp, 9_007_199_254_740_993, "" // > 2^53
	callerVersion := newCredential("tenant-b", "caller-version")
	callerVersion.Version = 7

	for _, c := range []store.Credential{newCredential("tenant-a", "wialon-1"), minimal, fleetUp, callerVersion} {
		t.Run(c.CredentialID, func(t *testing.T) {
			res, err := h.Store.PutCredential(ctx, c, store.PutOptions{})
			if err != nil || !res.Created || res.Replayed {
				t.Fatalf("PutCredential(new) = %+v, err %v; want created, nil", res, err)
			}
			want := c
			want.Version = 1
			want.ADVersion = max(c.ADVersion, 1) // 0 is stored as 1
			got := res.Credential
			assertCredential(t, "PutCredential", got, want)
			got, err = h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
			if err != nil {
				t.Fatalf("GetCredential: %v", err)
			}
			assertCredential(t, "GetCredential", got, want)
		})
	}
}

func testPutReplace(t *testing.T, h Harness) {
	ctx := testContext(t)
	first := newCredential("tenant-a", "cred-1")
	mustPut(t, h, first)

	second := first
	second.Version = 99 // ignored
	second.Ciphertext = "vault:v1:replaced"
	second.Fingerprint = "fp-replaced"
	second.BaseURL = ""
	second.Labels = map[string]string{"team": "ops"}
	second.CreateTime = first.CreateTime.Add(time.Hour) // ignored: kept from the first put
	second.UpdateTime = first.UpdateTime.Add(time.Hour)
	second.ValidateTime = time.Time{}
	second.ValidationState, second.ValidationMessage, second.UpstreamUser = store.ValidationNotValidated, "", ""

	second.ADVersion = 1
	res, err := h.Store.PutCredential(ctx, second, store.PutOptions{})
	if err != nil || res.Created {
		t.Fatalf("PutCredential(existing) = created %v, err %v; want replaced, nil", res.Created, err)
	}
	want := second
	want.Version = 2
	want.CreateTime = first.CreateTime
	assertCredential(t, "PutCredential(replace)", res.Credential, want)
	got, err := h.Store.GetCredential(ctx, first.TenantID, first.CredentialID)
	if err != nil {
		t.Fatalf("GetCredential: %v", err)
	}
	assertCredential(t, "GetCredential after replace", got, want)

	if got := mustPut(t, h, second); got.Version != 3 {
		t.Errorf("third put: version %d, want 3", got.Version)
	}
}

// testGenerationNeverRepeats: every Put stores a new generation, also when a
// deleted credential is created again at version 1; validation and rewrap
// keep it (the secret is the same).
func testGenerationNeverRepeats(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := newCredential("tenant-a", "cred-gen")
	seen := map[string]string{}
	record := func(what string, got store.Credential) {
		t.Helper()
		if got.Generation == "" {
			t.Fatalf("%s: empty generation", what)
		}
		if prev, ok := seen[got.Generation]; ok {
			t.Fatalf("%s: generation %q repeats the one of %s", what, got.Generation, prev)
		}
		seen[got.Generation] = what
	}
	first := mustPut(t, h, c)
	record("first put", first)
	record("replace", mustPut(t, h, c))
	if _, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{}); err != nil {
		t.Fatalf("DeleteCredential: %v", err)
	}
	recreated := mustPut(t, h, c)
	if recreated.Version != 1 {
		t.Fatalf("recreated version = %d, want 1", recreated.Version)
	}
	record("recreate", recreated)

	validated, err := h.Store.SetValidation(ctx, c.TenantID, c.CredentialID, recreated.Version, store.Validation{State: store.ValidationValid, Time: time.Now()})
	if err != nil {
		t.Fatalf("SetValidation: %v", err)
	}
	if err := h.Store.UpdateCiphertext(ctx, c.TenantID, c.CredentialID, recreated.Version, "vault:v2:rewrapped", 2); err != nil {
		t.Fatalf("UpdateCiphertext: %v", err)
	}
	got, err := h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
	if err != nil {
		t.Fatalf("GetCredential: %v", err)
	}
	if validated.Generation != recreated.Generation || got.Generation != recreated.Generation {
		t.Errorf("generation changed by validation or rewrap: %q, %q; want %q", validated.Generation, got.Generation, recreated.Generation)
	}
}

func testGetMissing(t *testing.T, h Harness) {
	ctx := testContext(t)
	mustPut(t, h, newCredential("tenant-a", "cred-1"))
	for _, tc := range []struct{ name, tenant, id string }{
		{"unknown tenant", "tenant-z", "cred-1"},
		{"unknown id", "tenant-a", "cred-2"},
		{"id prefix", "tenant-a", "cred"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.Store.GetCredential(ctx, tc.tenant, tc.id)
			assertIs(t, "GetCredential", err, store.ErrNotFound)
		})
	}
}

func testInvalidIDs(t *testing.T, h Harness) {
	ctx := testContext(t)
	for _, tc := range []struct{ name, tenant, id string }{
		{"empty tenant", "", "cred-1"},
		{"empty id", "tenant-a", ""},
		{"colon in id", "tenant-a", "cred:sessions"},
		{"brace in tenant", "ten{ant}", "cred-1"},
		{"close brace in tenant", "tenant}", "cred-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.Store.PutCredential(ctx, newCredential(tc.tenant, tc.id), store.PutOptions{})
			assertIs(t, "PutCredential", err, store.ErrInvalidArgument)
			_, err = h.Store.GetCredential(ctx, tc.tenant, tc.id)
			assertIs(t, "GetCredential", err, store.ErrInvalidArgument)
		})
	}
}

func testListPagination(t *testing.T, h Harness) {
	ids := []string{"a", "B", "b-1", "b.2", "b", "c0", "Z9", "z"}
	for i, tc := range []struct {
		n, pageSize int
		wantPages   []int
	}{
		{7, 3, []int{3, 3, 1}},
		{6, 3, []int{3, 3}},
		{8, 1, []int{1, 1, 1, 1, 1, 1, 1, 1}},
		{2, 5, []int{2}},
		{0, 3, []int{0}},
	} {
		t.Run(fmt.Sprintf("%d by %d", tc.n, tc.pageSize), func(t *testing.T) {
			ctx := testContext(t)
			tenant := fmt.Sprintf("list-%d", i)
			// Neighbours whose keys sort right around this tenant's.
			for _, other := range []string{tenant + "0", tenant[:len(tenant)-1]} {
				for _, id := range ids[:3] {
					mustPut(t, h, newCredential(other, id))
				}
			}
			want := slices.Clone(ids[:tc.n])
			for _, j := range rand.Perm(len(want)) {
				mustPut(t, h, newCredential(tenant, want[j]))
			}
			slices.Sort(want)

			var got []string
			var sizes []int
			token := ""
			for page := 0; ; page++ {
				if page > tc.n+1 {
					t.Fatalf("pagination does not end; ids so far %q", got)
				}
				creds, next, err := h.Store.ListCredentials(ctx, tenant, tc.pageSize, token)
				if err != nil {
					t.Fatalf("ListCredentials(page %d): %v", page, err)
				}
				sizes = append(sizes, len(creds))
				for _, c := range creds {
					if c.TenantID != tenant {
						t.Errorf("page %d holds %s/%s, not of tenant %s", page, c.TenantID, c.CredentialID, tenant)
					}
					got = append(got, c.CredentialID)
				}
				if next == "" {
					break
				}
				token = next
			}
			if !slices.Equal(sizes, tc.wantPages) {
				t.Errorf("page sizes %v, want %v", sizes, tc.wantPages)
			}
			if !slices.Equal(got, want) {
				t.Errorf("listed ids %q, want %q (ordered by id)", got, want)
			}
		})
	}
}

func testListTenantIsolation(t *testing.T, h Harness) {
	ctx := testContext(t)
	tenants := map[string][]string{
		"tenant-a":  {"shared-1", "shared-2", "only-a"},
		"tenant-b":  {"shared-1", "shared-2", "only-b-1", "only-b-2"},
		"tenant-a2": {"shared-1"},
	}
	for tenant, ids := range tenants {
		for _, id := range ids {
			mustPut(t, h, newCredential(tenant, id))
		}
	}
	for tenant, ids := range tenants {
		creds, next, err := h.Store.ListCredentials(ctx, tenant, 100, "")
		if err != nil || next != "" {
			t.Fatalf("ListCredentials(%s) = next %q, err %v", tenant, next, err)
		}
		var got []string
		for _, c := range creds {
			if c.TenantID != tenant {
				t.Errorf("ListCredentials(%s) returned %s/%s", tenant, c.TenantID, c.CredentialID)
			}
			got = append(got, c.CredentialID)
		}
		if want := slices.Sorted(slices.Values(ids)); !slices.Equal(got, want) {
			t.Errorf("ListCredentials(%s) = %q, want %q", tenant, got, want)
		}
	}
	creds, next, err := h.Store.ListCredentials(ctx, "tenant-none", 10, "")
	if err != nil || len(creds) != 0 || next != "" {
		t.Errorf("ListCredentials(unknown tenant) = %d creds, next %q, err %v; want none", len(creds), next, err)
	}
}

func testListInvalidArguments(t *testing.T, h Harness) {
	ctx := testContext(t)
	mustPut(t, h, newCredential("tenant-a", "cred-1"))
	for _, tc := range []struct {
		name     string
		pageSize int
		token    string
	}{
		{"zero page size", 0, ""},
		{"negative page size", -1, ""},
		{"token not base64", 10, "!!not a token!!"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := h.Store.ListCredentials(ctx, "tenant-a", tc.pageSize, tc.token)
			assertIs(t, "ListCredentials", err, store.ErrInvalidArgument)
		})
	}
}

func testDeleteCredential(t *testing.T, h Harness) {
	ctx := testContext(t)
	c := newCredential("tenant-a", "cred-1")
	mustPut(t, h, c)
	mustPut(t, h, c) // version 2
	keep := mustPut(t, h, newCredential("tenant-a", "cred-2"))

	res, err := h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{})
	if err != nil || res.Revoked != 0 || res.Replayed {
		t.Fatalf("DeleteCredential = %+v, %v; want 0 sessions, nil", res, err)
	}
	_, err = h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
	assertIs(t, "GetCredential after delete", err, store.ErrNotFound)
	// Page size 1: a leftover index entry would show as an extra page.
	creds, next, err := h.Store.ListCredentials(ctx, c.TenantID, 1, "")
	if err != nil || next != "" || len(creds) != 1 || creds[0].CredentialID != keep.CredentialID {
		t.Errorf("ListCredentials after delete = %v, next %q, %v; want only %s on one page",
			credentialIDs(creds), next, err, keep.CredentialID)
	}
	_, err = h.Store.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{})
	assertIs(t, "DeleteCredential again", err, store.ErrNotFound)
	_, err = h.Store.DeleteCredential(ctx, "tenant-z", "cred-1", store.Request{})
	assertIs(t, "DeleteCredential of unknown tenant", err, store.ErrNotFound)

	// Re-created, it is a new credential: version history is gone.
	put, err := h.Store.PutCredential(ctx, c, store.PutOptions{})
	if err != nil || !put.Created || put.Credential.Version != 1 {
		t.Errorf("PutCredential after delete = version %d, created %v, %v; want 1, true, nil", put.Credential.Version, put.Created, err)
	}
}

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

func testSetValidation(t *testing.T, h Harness) {
	for _, tc := range []struct {
		name    string
		id      string // "" is the stored credential
		version int64  // the stored credential is at version 2
		wantErr error
	}{
		{"current version", "", 2, nil},
		{"stale version", "", 1, store.ErrVersionConflict},
		{"future version", "", 3, store.ErrVersionConflict},
		{"missing credential", "missing", 2, store.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			c := newCredential("tenant-a", "cred-1")
			mustPut(t, h, c)
			before := mustPut(t, h, c)
			id := cmp.Or(tc.id, c.CredentialID)
			v := store.Validation{
				State: store.ValidationRejected, Message: "bad token", UpstreamUser: "someone",
				Time: before.ValidateTime.Add(time.Minute + 123*time.Nanosecond),
			}
			got, err := h.Store.SetValidation(ctx, c.TenantID, id, tc.version, v)
			if tc.wantErr != nil {
				assertIs(t, "SetValidation", err, tc.wantErr)
				assertUnchanged(t, h, before)
				return
			}
			if err != nil {
				t.Fatalf("SetValidation: %v", err)
			}
			want := withValidation(before, v)
			assertCredential(t, "SetValidation", got, want)
			assertUnchanged(t, h, want)

			// A later outcome replaces every field, empty ones included.
			v = store.Validation{State: store.ValidationValid, Time: v.Time.Add(time.Minute)}
			got, err = h.Store.SetValidation(ctx, c.TenantID, id, tc.version, v)
			if err != nil {
				t.Fatalf("second SetValidation: %v", err)
			}
			assertCredential(t, "second SetValidation", got, withValidation(before, v))
		})
	}
}

// testRecordUse: the last use is recorded on the version used, changes
// nothing else, and is cleared when the secret is replaced (a new secret
// has not been used).
func testRecordUse(t *testing.T, h Harness) {
	for _, tc := range []struct {
		name    string
		id      string
		version int64
		wantErr error
	}{
		{"current version", "", 2, nil},
		{"stale version", "", 1, store.ErrVersionConflict},
		{"missing credential", "missing", 2, store.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			c := newCredential("tenant-a", "cred-1")
			mustPut(t, h, c)
			before := mustPut(t, h, c)
			at := time.Date(2026, 3, 4, 5, 6, 7, 89, time.UTC)
			err := h.Store.RecordUse(ctx, c.TenantID, cmp.Or(tc.id, c.CredentialID), tc.version, at)
			if tc.wantErr != nil {
				assertIs(t, "RecordUse", err, tc.wantErr)
				assertUnchanged(t, h, before)
				return
			}
			if err != nil {
				t.Fatalf("RecordUse: %v", err)
			}
			want := before
			want.LastUsedTime = at
			assertUnchanged(t, h, want)
			if replaced := mustPut(t, h, c); !replaced.LastUsedTime.IsZero() {
				t.Errorf("a replaced secret keeps the old one's last use %v", replaced.LastUsedTime)
			}
		})
	}
}

func testUpdateCiphertext(t *testing.T, h Harness) {
	for _, tc := range []struct {
		name    string
		id      string
		version int64
		wantErr error
	}{
		{"current version", "", 2, nil},
		{"stale version", "", 1, store.ErrVersionConflict},
		{"missing credential", "missing", 2, store.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			c := newCredential("tenant-a", "cred-1")
			mustPut(t, h, c)
			before := mustPut(t, h, c)
			err := h.Store.UpdateCiphertext(ctx, c.TenantID, cmp.Or(tc.id, c.CredentialID), tc.version, "vault:v2:rewrapped", 1)
			if tc.wantErr != nil {
				assertIs(t, "UpdateCiphertext", err, tc.wantErr)
				assertUnchanged(t, h, before)
				return
			}
			if err != nil {
				t.Fatalf("UpdateCiphertext: %v", err)
			}
			want := before
			// The ciphertext and its associated data version, and nothing
			// else: not the version, not the generation.
			want.Ciphertext, want.ADVersion = "vault:v2:rewrapped", 1
			assertUnchanged(t, h, want)
		})
	}
}

func testForEachCredential(t *testing.T, h Harness) {
	ctx := testContext(t)
	if err := h.Store.ForEachCredential(ctx, func(c store.Credential) error {
		t.Errorf("empty store visited %s/%s", c.TenantID, c.CredentialID)
		return nil
	}); err != nil {
		t.Fatalf("ForEachCredential(empty): %v", err)
	}

	want := map[string]store.Credential{}
	for i := range 300 { // more than one SCAN batch
		c := mustPut(t, h, newCredential(fmt.Sprintf("tenant-%d", i%7), fmt.Sprintf("cred-%03d", i)))
		want[c.TenantID+"/"+c.CredentialID] = c
		if i%50 == 0 {
			mustSession(t, h, c, longTTL) // session sets must not be visited
		}
	}
	visits := map[string]int{}
	err := h.Store.ForEachCredential(ctx, func(c store.Credential) error {
		key := c.TenantID + "/" + c.CredentialID
		visits[key]++
		if w, ok := want[key]; !ok {
			t.Errorf("visited unknown credential %s", key)
		} else if visits[key] == 1 {
			assertCredential(t, "ForEachCredential", c, w)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ForEachCredential: %v", err)
	}
	for _, key := range slices.Sorted(maps.Keys(want)) {
		if visits[key] != 1 {
			t.Errorf("%s visited %d times, want once", key, visits[key])
		}
	}
}

func testForEachCredentialStopsOnError(t *testing.T, h Harness) {
	ctx := testContext(t)
	for i := range 5 {
		mustPut(t, h, newCredential("tenant-a", fmt.Sprintf("cred-%d", i)))
	}
	errStop := errors.New("stop here")
	calls := 0
	err := h.Store.ForEachCredential(ctx, func(store.Credential) error {
		calls++
		return errStop
	})
	assertIs(t, "ForEachCredential", err, errStop)
	if calls != 1 {
		t.Errorf("fn called %d times after failing, want 1", calls)
	}
}

func testConcurrentPut(t *testing.T, h Harness) {
	const n = 20
	ctx := testContext(t)
	c := newCredential("tenant-a", "contended")
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		versions []int64
		creates  int
	)
	for i := range n {
		wg.Go(func() {
			c := c
			c.Ciphertext = fmt.Sprintf("vault:v1:writer-%d", i)
			res, err := h.Store.PutCredential(ctx, c, store.PutOptions{})
			if err != nil {
				t.Errorf("PutCredential: %v", err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			versions = append(versions, res.Credential.Version)
			if res.Created {
				creates++
			}
		})
	}
	wg.Wait()
	slices.Sort(versions)
	want := make([]int64, n)
	for i := range want {
		want[i] = int64(i + 1)
	}
	if !slices.Equal(versions, want) {
		t.Errorf("versions returned %v, want each of 1..%d once", versions, n)
	}
	if creates != 1 {
		t.Errorf("%d puts reported a create, want 1", creates)
	}
	got, err := h.Store.GetCredential(ctx, c.TenantID, c.CredentialID)
	if err != nil || got.Version != n {
		t.Errorf("GetCredential = version %d, %v; want %d", got.Version, err, n)
	}
}

func testCancelledContext(t *testing.T, h Harness) {
	c := mustPut(t, h, newCredential("tenant-a", "cred-1"))
	s := mustSession(t, h, c, longTTL)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for _, op := range []struct {
		name string
		call func() error
	}{
		{"GetCredential", func() error { _, err := h.Store.GetCredential(ctx, c.TenantID, c.CredentialID); return err }},
		{"PutCredential", func() error { _, err := h.Store.PutCredential(ctx, c, store.PutOptions{}); return err }},
		{"GetSession", func() error { _, err := h.Store.GetSession(ctx, s.HandleHash); return err }},
		{"ForEachCredential", func() error {
			return h.Store.ForEachCredential(ctx, func(store.Credential) error { return nil })
		}},
	} {
		err := op.call()
		assertIs(t, op.name+" with a cancelled context", err, context.Canceled)
		assertIs(t, op.name+" with a cancelled context", err, store.ErrUnavailable)
	}
}

// newCredential returns a credential of tenant with every field set, times
// with nanoseconds and in a non-UTC zone to catch lossy storage.
func newCredential(tenant, id string) store.Credential {
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	created := time.Date(2025, 3, 14, 15, 9, 26, 535897932, zone)
	return store.Credential{
		TenantID:          tenant,
		CredentialID:      id,
		Provider:          store.ProviderWialon,
		Ciphertext:        "vault:v1:" + tenant + ":" + id,
		ADVersion:         2,
		Fingerprint:       "fp-" + id,
		BaseURL:           "https://hst-api.wialon.com",
		Labels:            map[string]string{"env": "prod", "region": "eu-west", "empty": ""},
		CreateTime:        created,
		UpdateTime:        created.Add(time.Second + 1),
		ValidateTime:      created.Add(2*time.Second + 2),
		ValidationState:   store.ValidationValid,
		ValidationMessage: "ok",
		UpstreamUser:      "user@example.com",
	}
}

// newSession returns a session for c, expiring ttl from now, with a fresh
// random handle hash.
func newSession(c store.Credential, ttl time.Duration) store.Session {
	now := time.Now()
	id := fmt.Sprintf("sess-%016x", rand.Uint64())
	return store.Session{
		HandleHash:   sha256.Sum256([]byte(id)),
		SessionID:    id,
		TenantID:     c.TenantID,
		CredentialID: c.CredentialID,
		Scopes:       []string{"units:read", "history:read"},
		CreateTime:   now,
		ExpireTime:   now.Add(ttl),
		Binding:      "k1." + id,
	}
}

func mustPut(t *testing.T, h Harness, c store.Credential) store.Credential {
	t.Helper()
	res, err := h.Store.PutCredential(testContext(t), c, store.PutOptions{})
	if err != nil {
		t.Fatalf("PutCredential(%s/%s): %v", c.TenantID, c.CredentialID, err)
	}
	return res.Credential
}

func mustSession(t *testing.T, h Harness, c store.Credential, ttl time.Duration) store.Session {
	t.Helper()
	s := newSession(c, ttl)
	if _, err := h.Store.CreateSession(testContext(t), s, store.Request{}); err != nil {
		t.Fatalf("CreateSession(%s/%s): %v", c.TenantID, c.CredentialID, err)
	}
	return s
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), callTimeout)
	t.Cleanup(cancel)
	return ctx
}

func withValidation(c store.Credential, v store.Validation) store.Credential {
	c.ValidationState, c.ValidationMessage, c.UpstreamUser, c.ValidateTime = v.State, v.Message, v.UpstreamUser, v.Time
	return c
}

func credentialIDs(creds []store.Credential) []string {
	ids := make([]string, len(creds))
	for i, c := range creds {
		ids[i] = c.CredentialID
	}
	return ids
}

func assertIs(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: error %v, want %v", what, err, target)
	}
}

// assertUnchanged checks that the stored credential is still want.
func assertUnchanged(t *testing.T, h Harness, want store.Credential) {
	t.Helper()
	got, err := h.Store.GetCredential(testContext(t), want.TenantID, want.CredentialID)
	if err != nil {
		t.Fatalf("GetCredential: %v", err)
	}
	assertCredential(t, "stored credential", got, want)
}

// assertCredential compares field by field: times by instant (a store may
// return another zone), labels with nil and empty equal.
func assertCredential(t *testing.T, what string, got, want store.Credential) {
	t.Helper()
	for _, tc := range []struct {
		field     string
		got, want time.Time
	}{
		{"CreateTime", got.CreateTime, want.CreateTime},
		{"UpdateTime", got.UpdateTime, want.UpdateTime},
		{"ValidateTime", got.ValidateTime, want.ValidateTime},
	} {
		if !tc.got.Equal(tc.want) {
			t.Errorf("%s: %s = %v, want %v", what, tc.field, tc.got, tc.want)
		}
	}
	if want.Generation == "" {
		// A Put without one gets a fresh generation: any non-empty value.
		if got.Generation == "" {
			t.Errorf("%s: Generation is empty, want a fresh one", what)
		}
		got.Generation = ""
	}
	if len(got.Labels) != 0 || len(want.Labels) != 0 {
		if !maps.Equal(got.Labels, want.Labels) {
			t.Errorf("%s: Labels = %v, want %v", what, got.Labels, want.Labels)
		}
	}
	got.CreateTime, got.UpdateTime, got.ValidateTime, got.Labels = time.Time{}, time.Time{}, time.Time{}, nil
	want.CreateTime, want.UpdateTime, want.ValidateTime, want.Labels = time.Time{}, time.Time{}, time.Time{}, nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s:\n got %+v\nwant %+v", what, got, want)
	}
}

func assertSession(t *testing.T, what string, got, want store.Session) {
	t.Helper()
	if !got.CreateTime.Equal(want.CreateTime) || !got.ExpireTime.Equal(want.ExpireTime) {
		t.Errorf("%s: times %v..%v, want %v..%v", what, got.CreateTime, got.ExpireTime, want.CreateTime, want.ExpireTime)
	}
	got.CreateTime, got.ExpireTime = time.Time{}, time.Time{}
	want.CreateTime, want.ExpireTime = time.Time{}, time.Time{}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s:\n got %+v\nwant %+v", what, got, want)
	}
}
