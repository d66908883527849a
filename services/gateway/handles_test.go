package gateway_test

import (
	"context"
	"crypto/sha256"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

func withHandle(h string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+h)
}

// TestForgedHandlesCostNothing: handles that do not carry the handle key's
// MAC are refused by the gateway itself — no ResolveSession, no store read,
// no audit line at the credentials service — whatever their shape.
func TestForgedHandlesCostNothing(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putWialon(t, "w")
	other, err := handle.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		forged, _, err := other.New()
		if err != nil {
			t.Fatal(err)
		}
		_, err = st.gateways[0].ListUnits(withHandle(forged), &telematicsv1.ListUnitsRequest{})
		wantCode(t, err, codes.Unauthenticated)
	}
	if n := st.resolves.Load(); n != 0 {
		t.Fatalf("forged handles cost %d ResolveSession calls, want 0", n)
	}
}

// TestRefusedHandlesAreRemembered: a handle the credentials service called
// invalid (here: revoked) is answered from memory the next times.
func TestRefusedHandlesAreRemembered(t *testing.T) {
	st := newStack(t, stackOptions{})
	st.putWialon(t, "w")
	ctx, h := st.issue(t, "w")
	if _, err := st.sessions.RevokeSession(context.Background(), &credentialsv1.RevokeSessionRequest{Handle: h}); err != nil {
		t.Fatal(err)
	}
	for range 10 {
		_, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
		wantCode(t, err, codes.Unauthenticated)
	}
	if n := st.resolves.Load(); n != 1 {
		t.Fatalf("a revoked handle presented 10 times cost %d ResolveSession calls, want 1", n)
	}
}

// TestInvalidHandleBudgetPerPeer: a peer that keeps presenting invalid
// handles is refused (RESOURCE_EXHAUSTED, with how long to wait) for any
// handle this replica has not resolved, while a handle it did resolve keeps
// being served from the cache.
func TestInvalidHandleBudgetPerPeer(t *testing.T) {
	st := newStack(t, stackOptions{handleCacheTTL: gateway.DefaultHandleCacheTTL})
	st.putWialon(t, "w")
	cachedCtx, _ := st.issue(t, "w")
	if _, err := st.gateways[0].ListUnits(cachedCtx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	freshCtx, _ := st.issue(t, "w")
	resolved := st.resolves.Load()

	for range gateway.DefaultInvalidHandleBurst + 5 {
		_, err := st.gateways[0].ListUnits(withHandle("fbs_not-even-close"), &telematicsv1.ListUnitsRequest{})
		if c := codeOf(err); c != codes.Unauthenticated {
			t.Fatalf("an invalid handle: %v, want UNAUTHENTICATED", err)
		}
	}
	_, err := st.gateways[0].ListUnits(freshCtx, &telematicsv1.ListUnitsRequest{})
	s := wantCode(t, err, codes.ResourceExhausted)
	var retry *errdetails.RetryInfo
	for _, d := range s.Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 {
		t.Fatalf("RESOURCE_EXHAUSTED without RetryInfo: %v", s.Details())
	}
	if n := st.resolves.Load(); n != resolved {
		t.Fatalf("an over-budget peer still caused %d ResolveSession calls", n-resolved)
	}
	if _, err := st.gateways[0].ListUnits(cachedCtx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatalf("a handle resolved before the flood: %v", err)
	}
}

// TestPreUpgradeHandlesAtTheGateway: a session issued by the previous
// release (CRC32 handle, no binding) keeps working through the gateway
// while the legacy window is open; once it is closed, the gateway refuses
// CRC32 handles itself, without asking the credentials service.
func TestPreUpgradeHandlesAtTheGateway(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.putWialon(t, "w")
	time.Sleep(2 * time.Millisecond) // the session must be younger than its credential
	old, _, err := handle.NewLegacy()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	s := store.Session{HandleHash: sha256.Sum256([]byte(old)), SessionID: "ses_preupgrade", TenantID: tenant, CredentialID: "w",
		Scopes: []string{"read"}, CreateTime: now, ExpireTime: now.Add(time.Hour)}
	if _, err := store.NewRedis(st.redis, store.RedisOptions{Prefix: st.prefix}).CreateSession(context.Background(), s, store.Request{}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.gateways[0].ListUnits(withHandle(old), &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatalf("pre-upgrade handle inside the window: %v", err)
	}

	if err := st.redis.Set(context.Background(), st.prefix+":handles:legacy-until", "0", 0).Err(); err != nil {
		t.Fatal(err)
	}
	before := st.resolves.Load()
	forged, _, _ := handle.NewLegacy() // a CRC32 handle anyone can make
	for _, h := range []string{old, forged} {
		// The second replica has not read the window yet: it reads it now.
		_, err := st.gateways[1].ListUnits(withHandle(h), &telematicsv1.ListUnitsRequest{})
		wantCode(t, err, codes.Unauthenticated)
	}
	if n := st.resolves.Load() - before; n != 0 {
		t.Fatalf("CRC32 handles after the window cost %d ResolveSession calls, want 0", n)
	}
}

// TestEditedBaseURLSendsNothing is the Redis writer who points a stored
// credential at another host on the allow-list: the gateway's next login
// must fail, and that host must see no request (and so no token). It holds
// for credentials stored by this release and for those the previous
// release stored (bound to tenant and credential only) once `migrate` has
// re-sealed them.
func TestEditedBaseURLSendsNothing(t *testing.T) {
	var stolen atomic.Int64
	thief := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		stolen.Add(1)
		http.Error(w, "nothing here", http.StatusNotFound)
	}))
	t.Cleanup(thief.Close)
	st := newStack(t, stackOptions{extraAllowed: []string{strings.TrimPrefix(thief.URL, "http://")}})
	st.putWialon(t, "w")
	st.putFleetUp(t, "f")

	// Stored by a replica of the previous release's formats, then migrated.
	previous := st.credentials(t, app.CredentialsConfig{WriteLegacyFormats: true})
	_, err := previous.PutCredential(context.Background(), &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "old",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken, BaseUrl: st.simURL}}})
	if err != nil {
		t.Fatal(err)
	}
	migrated, err := st.credSvc.Migrate(context.Background(), nil)
	if err != nil || migrated.Migrated != 1 || migrated.Current != 2 {
		t.Fatalf("migrate = %+v, %v; want 1 re-encrypted, 2 current", migrated, err)
	}

	for _, id := range []string{"w", "f", "old"} {
		ctx, _ := st.issue(t, id)
		if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
			t.Fatalf("%s before the edit: %v", id, err)
		}
		// A fresh credential version: nothing cached from before the edit.
		key := st.prefix + ":{" + tenant + "}:cred:" + id
		if err := st.redis.HSet(context.Background(), key, "base_url", thief.URL).Err(); err != nil {
			t.Fatal(err)
		}
		if err := st.redis.HIncrBy(context.Background(), key, "version", 1).Err(); err != nil {
			t.Fatal(err)
		}
		ctx, _ = st.issue(t, id)
		if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err == nil {
			t.Fatalf("%s: ListUnits with an edited base URL succeeded", id)
		}
	}
	if n := stolen.Load(); n != 0 {
		t.Fatalf("the host named by the edited base URL received %d requests", n)
	}
	for _, canary := range []string{canaryToken, canarySecret, canaryAPIKey} {
		if strings.Contains(st.logs.String(), canary) {
			t.Fatalf("a secret reached the logs")
		}
	}
}

func codeOf(err error) codes.Code {
	s, _ := status.FromError(err)
	return s.Code()
}

// TestConcurrentLookupsShareOneResolution: calls and streams that present
// one handle together, when the replica has no fresh resolution of it (its
// streams revalidating as the cache entry expires), cost one ResolveSession
// between them, not one each.
func TestConcurrentLookupsShareOneResolution(t *testing.T) {
	st := newStack(t, stackOptions{handleCacheTTL: gateway.DefaultHandleCacheTTL})
	st.putWialon(t, "w")
	ctx, _ := st.issue(t, "w")
	before := st.resolves.Load()
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if n := st.resolves.Load() - before; n != 1 {
		t.Fatalf("32 concurrent calls with one new handle cost %d ResolveSession calls, want 1", n)
	}
}
