package storetest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

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
