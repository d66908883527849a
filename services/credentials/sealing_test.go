package credentials_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// credKey is the Redis hash of a credential record.
func (h *harness) credKey(tenant, id string) string {
	return h.prefix + ":{" + tenant + "}:cred:" + id
}

// TestRoutingFieldsAreBound is the Redis writer who edits where a secret
// goes: the provider, the base URL (another host on the allow-list) or the
// FleetUp account. The secret no longer opens, so it is sent nowhere.
func TestRoutingFieldsAreBound(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		for _, tt := range []struct {
			name, field, value string
			fleetup            bool
		}{
			{"base url", "base_url", "https://hst-api.wialon.com", false},
			{"provider", "provider", "fleetup", false},
			{"fleetup account", "fleetup_account_id", "4243", true},
			{"fleetup base url", "base_url", "https://api.fleetup.net", true},
		} {
			t.Run(tt.name, func(t *testing.T) {
				id := "cred-" + fmt.Sprint(len(tt.name))
				put := h.wialonPut("acme", id)
				if tt.fleetup {
					put = h.fleetupPut("acme", id)
				}
				if _, err := h.creds.PutCredential(ctx, put); err != nil {
					t.Fatal(err)
				}
				issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: id})
				if err != nil {
					t.Fatal(err)
				}
				if err := h.openSecret(ctx, issued.GetHandle()); err != nil {
					t.Fatalf("unedited: %v", err)
				}
				if err := h.rdb.HSet(ctx, h.credKey("acme", id), tt.field, tt.value).Err(); err != nil {
					t.Fatal(err)
				}
				err = h.openSecret(ctx, issued.GetHandle())
				wantUndecryptable(t, err)
				_, err = h.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: id})
				wantUndecryptable(t, err)
				h.assertNoCanary(t, err)
			})
		}
	})
}

// TestMigrateUnderLoad upgrades records written by the previous release
// (version 1 associated data) while the service keeps serving, runs the
// migration twice, and checks that every secret still opens, that the
// second run finds nothing to do, and that afterwards an edited base URL
// no longer opens the secret.
func TestMigrateUnderLoad(t *testing.T) {
	// The load logs in far more often than Wialon lets one IP (120 a
	// minute); the login limits are not what this test is about.
	manyLogins := func(c *app.CredentialsConfig) { c.WialonLoginLimit = 1 << 20 }
	for _, be := range backends() {
		t.Run(be.name, func(t *testing.T) {
			h := newHarnessWith(t, be, harnessOptions{adjust: []func(*app.CredentialsConfig){manyLogins},
				sim: simulator.Config{WialonLoginsPerMinute: -1}})
			testMigrateUnderLoad(t, h, manyLogins)
		})
	}
}

func testMigrateUnderLoad(t *testing.T, h *harness, manyLogins func(*app.CredentialsConfig)) {
	ctx := context.Background()
	old, _ := h.replica(t, harnessOptions{writeLegacy: true, adjust: []func(*app.CredentialsConfig){manyLogins}}) // a replica of the previous release's formats
	const n = 40
	for i := range n {
		if _, err := old.creds.PutCredential(ctx, h.wialonPut("acme", fmt.Sprintf("w%02d", i))); err != nil {
			t.Fatal(err)
		}
	}
	before, err := h.store.GetCredential(ctx, "acme", "w00")
	if err != nil || before.ADVersion != credentials.ADTenantCredential {
		t.Fatalf("a record of the previous release: associated data version %d, %v; want 1", before.ADVersion, err)
	}

	// Load: the new release replaces some credentials and reads others
	// while the migration runs.
	var wg sync.WaitGroup
	loadErrs := make(chan error, 4*n)
	stop := make(chan struct{})
	for w := range 4 {
		wg.Go(func() {
			for i := w; ; i = (i + 4) % n {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("w%02d", i)
				if i%8 == 0 {
					if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", id)); err != nil {
						loadErrs <- fmt.Errorf("put %s: %w", id, err)
					}
					continue
				}
				if _, err := h.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: id}); err != nil && !isConcurrentUpdate(err) {
					loadErrs <- fmt.Errorf("validate %s: %w", id, err)
				}
			}
		})
	}
	first, err := h.svc.Migrate(ctx, nil)
	close(stop)
	wg.Wait()
	close(loadErrs)
	for err := range loadErrs {
		t.Error(err)
	}
	if err != nil || first.Seen != n || first.Failed != 0 || first.Migrated+first.Current+first.Skipped != n || first.Migrated == 0 {
		t.Fatalf("first migration = %+v, %v", first, err)
	}
	second, err := h.svc.Migrate(ctx, nil)
	if err != nil || second.Seen != n || second.Current != n || second.Migrated != 0 {
		t.Fatalf("second migration = %+v, %v; want all %d current, none re-encrypted", second, err, n)
	}
	for i := range n {
		id := fmt.Sprintf("w%02d", i)
		rec, err := h.store.GetCredential(ctx, "acme", id)
		if err != nil || rec.ADVersion != credentials.ADRouting {
			t.Fatalf("%s: associated data version %d, %v; want 2", id, rec.ADVersion, err)
		}
		issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: id})
		if err != nil {
			t.Fatal(err)
		}
		// The mint logs in to the simulator, which knows only the canary
		// token: success means the secret opened whole.
		if err := h.openSecret(ctx, issued.GetHandle()); err != nil {
			t.Fatalf("%s does not open after migration: %v", id, err)
		}
	}

	// Migrated, the base URL is bound.
	issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w01"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.rdb.HSet(ctx, h.credKey("acme", "w01"), "base_url", "https://hst-api.wialon.com").Err(); err != nil {
		t.Fatal(err)
	}
	err = h.openSecret(ctx, issued.GetHandle())
	wantUndecryptable(t, err)

	// A Redis writer who kept the old version 1 ciphertext writes it
	// back, with an edited base URL: version 1 binds no URL, so it opens
	// again, until the service refuses version 1 altogether
	// (--legacy-associated-data=false, once migrated).
	issued, err = h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w00"})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.rdb.HSet(ctx, h.credKey("acme", "w00"), "ciphertext", before.Ciphertext, "ad_version", "1", "base_url", "https://hst-api.wialon.com").Err(); err != nil {
		t.Fatal(err)
	}
	// It opens, and the login goes to the edited host (unreachable
	// here, so UNAVAILABLE): exactly the attack the strict mode ends.
	if err := h.openSecret(ctx, issued.GetHandle()); err != nil && apierr.Reason(err) == apierr.ReasonCredentialUndecryptable {
		t.Fatalf("version 1 is still accepted by default, yet the written-back ciphertext did not open: %v", err)
	}
	strict, _ := h.replica(t, harnessOptions{refuseLegacyAD: true})
	err = strict.openSecret(ctx, issued.GetHandle())
	wantUndecryptable(t, err)
	h.assertNoCanary(t, err)
}

// TestMigrateRefusesWhileWritingLegacyFormats: a service still writing
// version 1 (the first phase of an upgrade) must not migrate.
func TestMigrateRefusesWhileWritingLegacyFormats(t *testing.T) {
	h := newHarnessWith(t, backends()[1], harnessOptions{writeLegacy: true})
	if _, err := h.svc.Migrate(context.Background(), nil); err == nil {
		t.Fatal("Migrate under --write-legacy-formats did not fail")
	}
}

func isConcurrentUpdate(err error) bool {
	return err != nil && (codeOf(err) == codes.Aborted)
}
