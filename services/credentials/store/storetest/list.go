package storetest

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

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
