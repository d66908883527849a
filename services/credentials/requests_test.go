package credentials_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// TestRequestIDsApplyOnce is a client (or a mesh) retrying each mutating
// call with the same request_id, as after a timeout: the write happens
// once and every retry gets the first reply, whole.
func TestRequestIDsApplyOnce(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		put := h.wialonPut("acme", "w")
		put.RequestId = "4c0d2f4e-0d7c-4a55-9b5e-5c3c7e1a0001"
		first, err := h.creds.PutCredential(ctx, put)
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			again, err := h.creds.PutCredential(ctx, put)
			if err != nil {
				t.Fatalf("retried PutCredential: %v", err)
			}
			if diff := cmp.Diff(first, again, protocmp.Transform()); diff != "" {
				t.Fatalf("retried PutCredential answered differently (-first +retry):\n%s", diff)
			}
		}
		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil || got.GetCredential().GetVersion() != 1 || !first.GetCreated() {
			t.Fatalf("after retries: version %d, %v; want version 1 (created once)", got.GetCredential().GetVersion(), err)
		}

		// The same id for another request is a client bug, said so.
		other := proto.Clone(put).(*credentialsv1.PutCredentialRequest)
		other.Labels = map[string]string{"team": "other"}
		_, err = h.creds.PutCredential(ctx, other)
		if st := wantCode(t, err, codes.InvalidArgument); !strings.Contains(strings.Join(badRequestFields(st), ","), "request_id") {
			t.Fatalf("reused request_id: %v, want the field request_id named", err)
		}

		issue := &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w", Ttl: durationpb.New(10 * time.Minute),
			RequestId: "4c0d2f4e-0d7c-4a55-9b5e-5c3c7e1a0002"}
		session, err := h.sessions.IssueSession(ctx, issue)
		if err != nil {
			t.Fatal(err)
		}
		retried, err := h.sessions.IssueSession(ctx, issue)
		if err != nil {
			t.Fatalf("retried IssueSession: %v", err)
		}
		if diff := cmp.Diff(session, retried, protocmp.Transform()); diff != "" {
			t.Fatalf("retried IssueSession answered differently (-first +retry):\n%s", diff)
		}
		if _, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: retried.GetHandle()}); err != nil {
			t.Fatalf("the handle returned to the retry does not work: %v", err)
		}

		del := &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "w", RequestId: "4c0d2f4e-0d7c-4a55-9b5e-5c3c7e1a0003"}
		deleted, err := h.creds.DeleteCredential(ctx, del)
		if err != nil || deleted.GetRevokedSessions() != 1 {
			t.Fatalf("DeleteCredential = %v, %v; want 1 session revoked (the retried issue made no second one)", deleted, err)
		}
		again, err := h.creds.DeleteCredential(ctx, del)
		if err != nil || !proto.Equal(again, deleted) {
			t.Fatalf("retried DeleteCredential = %v, %v; want the first reply %v, not NOT_FOUND", again, err, deleted)
		}
		// Without a request id a repeated delete is a new request.
		_, err = h.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "w"})
		wantCode(t, err, codes.NotFound)

		for _, hd := range []string{session.GetHandle()} {
			if strings.Contains(h.logs.String(), hd) || strings.Contains(h.dump(), hd) {
				t.Fatal("a handle appears in logs or Redis (a retry must be answered without storing it)")
			}
		}
		h.assertNoCanary(t)
	})
}

func TestPutExpectedVersion(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		ver := func(v int64) *int64 { return &v }
		create := h.wialonPut("acme", "w")
		create.ExpectedVersion = ver(0)
		if _, err := h.creds.PutCredential(ctx, create); err != nil {
			t.Fatalf("create with expected_version 0: %v", err)
		}
		_, err := h.creds.PutCredential(ctx, create)
		wantCode(t, err, codes.Aborted)
		replace := h.fleetupPut("acme", "w")
		replace.ExpectedVersion = ver(1)
		if resp, err := h.creds.PutCredential(ctx, replace); err != nil || resp.GetCredential().GetVersion() != 2 {
			t.Fatalf("replace at version 1 = %v, %v", resp, err)
		}
		_, err = h.creds.PutCredential(ctx, replace) // stale: now at 2
		wantCode(t, err, codes.Aborted)
		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "w"})
		if err != nil || got.GetCredential().GetVersion() != 2 || got.GetCredential().GetProvider() != credentialsv1.Provider_PROVIDER_FLEETUP {
			t.Fatalf("stored = %v, %v; want the version 2 FleetUp credential", got, err)
		}
	})
}

// TestFrozenRedis freezes a real redis-server (SIGSTOP) under the
// credentials service, built on the production Redis client with a 500 ms
// --redis-timeout: every call, including those queued for a pooled
// connection, answers UNAVAILABLE within about that timeout rather than
// when Redis thaws. A put in flight at the freeze is applied when Redis
// thaws (its command was already sent); retried with its request_id it
// returns that first result — created, version 1 — instead of writing
// again.
func TestFrozenRedis(t *testing.T) {
	const timeout = 500 * time.Millisecond
	srv := testenv.RedisOwn(t)
	rdb, err := app.NewRedis(t.Context(), app.RedisConfig{Addrs: []string{srv.Addr}, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	keyring, err := transit.NewKeyring()
	if err != nil {
		t.Fatal(err)
	}
	h := newHarnessWith(t, backend{"own-redis+keyring", func(*testing.T) (redis.UniversalClient, string, transit.Rotatable) {
		return rdb, "fb", keyring
	}}, harnessOptions{})
	ctx := context.Background()
	if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "warm")); err != nil {
		t.Fatal(err)
	}

	srv.Freeze(t)
	thawed := false
	defer func() {
		if !thawed {
			srv.Thaw(t)
		}
	}()
	put := h.wialonPut("acme", "w")
	put.SkipValidation = true
	put.RequestId = "frozen-put-1"
	start := time.Now()
	_, err = h.creds.PutCredential(ctx, put)
	wantCode(t, err, codes.Unavailable)
	if took := time.Since(start); took > 2*timeout {
		t.Errorf("PutCredential on a frozen Redis took %s, want about the %s timeout", took, timeout)
	}

	// More calls at once than the pool has connections (10 per CPU): the
	// wait for a connection counts against the same bound.
	const calls = 60
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	for i := range calls {
		wg.Go(func() {
			start := time.Now()
			_, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: fmt.Sprintf("c%d", i)})
			if status.Code(err) != codes.Unavailable {
				errs <- fmt.Errorf("GetCredential on a frozen Redis: %v, want UNAVAILABLE", err)
			} else if took := time.Since(start); took > 2*timeout {
				errs <- fmt.Errorf("GetCredential on a frozen Redis took %s, want about the %s timeout", took, timeout)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	srv.Thaw(t)
	thawed = true
	resp, err := h.creds.PutCredential(ctx, put)
	if err != nil || !resp.GetCreated() || resp.GetCredential().GetVersion() != 1 {
		t.Fatalf("put retried with its request_id after the thaw = %v, %v; want created at version 1", resp, err)
	}
	got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "w"})
	if err != nil || got.GetCredential().GetVersion() != 1 {
		t.Fatalf("stored version %d, %v; want 1: the put was applied twice", got.GetCredential().GetVersion(), err)
	}
}

// TestRequestIDsUnderLegacyFormats: while the service still issues CRC32
// handles (the first phase of an upgrade), a retried IssueSession also gets
// the first handle back, and it works.
func TestRequestIDsUnderLegacyFormats(t *testing.T) {
	h := newHarnessWith(t, backends()[1], harnessOptions{writeLegacy: true})
	ctx := context.Background()
	if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "w")); err != nil {
		t.Fatal(err)
	}
	issue := &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w", RequestId: "legacy-issue-1"}
	first, err := h.sessions.IssueSession(ctx, issue)
	if err != nil {
		t.Fatal(err)
	}
	again, err := h.sessions.IssueSession(ctx, issue)
	if err != nil || !proto.Equal(first, again) || len(first.GetHandle()) != handle.LegacyLength {
		t.Fatalf("retried IssueSession = %v, %v; want the first reply with a CRC32 handle", again, err)
	}
	if _, err := h.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: again.GetHandle()}); err != nil {
		t.Fatalf("the handle returned to the retry: %v", err)
	}
}
