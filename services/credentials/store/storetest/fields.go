package storetest

import (
	"cmp"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

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
