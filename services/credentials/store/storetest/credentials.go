package storetest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

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
