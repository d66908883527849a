package credentials_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

func (h *harness) wialonItem(id, token string) *credentialsv1.BatchPutItem {
	return &credentialsv1.BatchPutItem{CredentialId: id,
		Secret: &credentialsv1.BatchPutItem_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: h.simURL}}}
}

func (h *harness) fleetupItem(id string) *credentialsv1.BatchPutItem {
	return &credentialsv1.BatchPutItem{CredentialId: id,
		Secret: &credentialsv1.BatchPutItem_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{ApiKey: "canary-api-key", AccountId: 4242, Secret: canaryFleetUpSecret, BaseUrl: h.simURL}}}
}

// otherToken is a well-formed Wialon token the simulator does not know.
const otherToken = "UNKNOWN0123456789abcdefUNKNOWN0123456789abcdefUNKNOWN0123456789abcdefUNK"

// TestBatchPutStoresEveryItem: a batch of Wialon and FleetUp credentials
// is stored item by item exactly as PutCredential stores each, in order,
// and every secret opens again.
func TestBatchPutStoresEveryItem(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		req := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", SkipValidation: true}
		for i := range 30 {
			it := h.wialonItem(fmt.Sprintf("w%02d", i), canaryToken)
			if i%3 == 0 {
				it = h.fleetupItem(fmt.Sprintf("f%02d", i))
			}
			if i%5 == 0 {
				it.Labels = map[string]string{"batch": "1"}
			}
			req.Items = append(req.Items, it)
		}
		resp, err := h.creds.BatchPutCredentials(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetResults()) != len(req.Items) {
			t.Fatalf("%d results for %d items", len(resp.GetResults()), len(req.Items))
		}
		for i, r := range resp.GetResults() {
			in := req.Items[i]
			if r.GetError() != nil || r.GetCredentialId() != in.GetCredentialId() || !r.GetCreated() || r.GetCredential().GetVersion() != 1 {
				t.Fatalf("result %d = %v, want %s created at version 1", i, r, in.GetCredentialId())
			}
			got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: in.GetCredentialId()})
			if err != nil {
				t.Fatal(err)
			}
			c := got.GetCredential()
			if c.GetFingerprint() != r.GetCredential().GetFingerprint() || c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_NOT_VALIDATED ||
				len(c.GetLabels()) != len(in.GetLabels()) || c.GetBaseUrl() != h.simURL {
				t.Errorf("%s stored as %v", in.GetCredentialId(), c)
			}
		}
		// Equal secrets of one tenant have equal fingerprints, as with PutCredential.
		single, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "single"))
		if err != nil {
			t.Fatal(err)
		}
		if single.GetCredential().GetFingerprint() != resp.GetResults()[1].GetCredential().GetFingerprint() {
			t.Error("a batch item's fingerprint differs from PutCredential's for the same secret")
		}
		for _, id := range []string{"w01", "f00"} {
			issued, err := h.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: id})
			if err != nil {
				t.Fatal(err)
			}
			if err := h.openSecret(ctx, issued.GetHandle()); err != nil {
				t.Errorf("%s does not open: %v", id, err)
			}
		}
		h.assertNoCanary(t)
	})
}

// TestBatchPutItemsFailAlone: an item whose base URL is not allowed, whose
// expected version is stale, or (validated) whose token the provider
// rejects fails with what PutCredential would have answered, and stores
// nothing; the items around it are stored.
func TestBatchPutItemsFailAlone(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		if _, err := h.creds.PutCredential(ctx, h.wialonPut("acme", "existing")); err != nil {
			t.Fatal(err)
		}
		badURL := h.wialonItem("bad-url", canaryToken)
		badURL.GetWialon().BaseUrl = "https://evil.example.com"
		stale := h.wialonItem("existing", canaryToken)
		stale.ExpectedVersion = new(int64) // 0: must not exist yet
		req := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", Items: []*credentialsv1.BatchPutItem{
			h.wialonItem("ok-1", canaryToken), badURL, stale, h.wialonItem("rejected", otherToken), h.fleetupItem("ok-2"),
		}}
		resp, err := h.creds.BatchPutCredentials(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		want := []struct {
			code   codes.Code
			reason string
			field  string
		}{
			{codes.OK, "", ""},
			{codes.InvalidArgument, apierr.ReasonInvalidArgument, "items[1].wialon.base_url"},
			{codes.Aborted, apierr.ReasonConcurrentUpdate, ""},
			{codes.FailedPrecondition, apierr.ReasonCredentialRejected, ""},
			{codes.OK, "", ""},
		}
		for i, r := range resp.GetResults() {
			e := r.GetError()
			if codes.Code(e.GetCode()) != want[i].code || e.GetReason() != want[i].reason || e.GetField() != want[i].field {
				t.Errorf("item %d (%s): error %v, want %v", i, r.GetCredentialId(), e, want[i])
			}
			if e != nil && (r.GetCredential() != nil || e.GetMessage() == "") {
				t.Errorf("item %d failed but has a credential, or no message: %v", i, r)
			}
			if e == nil && r.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID {
				t.Errorf("item %d was stored without being validated: %v", i, r.GetCredential())
			}
		}
		for _, id := range []string{"bad-url", "rejected"} {
			_, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: id})
			if codeOf(err) != codes.NotFound {
				t.Errorf("failed item %s was stored: %v", id, err)
			}
		}
		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "existing"})
		if err != nil || got.GetCredential().GetVersion() != 1 {
			t.Errorf("the stale item changed the existing credential: %v, %v", got, err)
		}
		h.assertNoCanary(t)
		for _, r := range resp.GetResults() {
			if strings.Contains(r.String(), otherToken) {
				t.Error("a result repeats the rejected token")
			}
		}
	})
}

// TestBatchPutRequestIDReplaysItemByItem: a batch sent again with its
// request_id returns the stored items' first results without storing them
// again, tries the failed items again, and refuses the id for an item that
// changed.
func TestBatchPutRequestIDReplaysItemByItem(t *testing.T) {
	forEachBackend(t, func(t *testing.T, h *harness) {
		ctx := context.Background()
		badURL := h.wialonItem("later", canaryToken)
		badURL.GetWialon().BaseUrl = "https://evil.example.com"
		req := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", SkipValidation: true, RequestId: "onboard-1", Items: []*credentialsv1.BatchPutItem{
			h.wialonItem("a", canaryToken), badURL, h.fleetupItem("b"),
		}}
		first, err := h.creds.BatchPutCredentials(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if first.GetResults()[1].GetError() == nil {
			t.Fatal("the item with a base URL not allowed was stored")
		}
		req.Items[1] = h.wialonItem("later", canaryToken) // fixed, sent again
		again, err := h.creds.BatchPutCredentials(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		for _, i := range []int{0, 2} {
			f, a := first.GetResults()[i].GetCredential(), again.GetResults()[i].GetCredential()
			if a == nil || a.GetVersion() != f.GetVersion() || a.GetFingerprint() != f.GetFingerprint() || !again.GetResults()[i].GetCreated() {
				t.Errorf("item %d replayed as %v, want the first result %v", i, again.GetResults()[i], first.GetResults()[i])
			}
		}
		if r := again.GetResults()[1]; r.GetError() != nil || r.GetCredential().GetVersion() != 1 {
			t.Errorf("the item that failed the first time: %v, want stored now", r)
		}
		got, err := h.creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "a"})
		if err != nil || got.GetCredential().GetVersion() != 1 {
			t.Errorf("a replayed item was stored again: %v, %v", got, err)
		}
		req.Items[0] = h.wialonItem("a", canaryToken2) // another secret under the same request id
		reused, err := h.creds.BatchPutCredentials(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if e := reused.GetResults()[0].GetError(); codes.Code(e.GetCode()) != codes.InvalidArgument || e.GetField() != "items[0].request_id" {
			t.Errorf("a changed item under a used request id: %v, want INVALID_ARGUMENT on items[0].request_id", e)
		}
	})
}

// TestBatchPutRefusesMalformedBatches: duplicate credential ids and more
// than 1,000 items are refused as a whole, before anything is stored.
func TestBatchPutRefusesMalformedBatches(t *testing.T) {
	h := newHarness(t, backends()[1])
	ctx := context.Background()
	dup := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", SkipValidation: true, Items: []*credentialsv1.BatchPutItem{
		h.wialonItem("same", canaryToken), h.fleetupItem("same"),
	}}
	_, err := h.creds.BatchPutCredentials(ctx, dup)
	wantCode(t, err, codes.InvalidArgument)
	big := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", SkipValidation: true}
	for i := range 1001 {
		big.Items = append(big.Items, h.wialonItem(fmt.Sprintf("c%04d", i), canaryToken))
	}
	_, err = h.creds.BatchPutCredentials(ctx, big)
	wantCode(t, err, codes.InvalidArgument)
	empty := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme"}
	_, err = h.creds.BatchPutCredentials(ctx, empty)
	wantCode(t, err, codes.InvalidArgument)
	list, err := h.creds.ListCredentials(ctx, &credentialsv1.ListCredentialsRequest{TenantId: "acme"})
	if err != nil || len(list.GetCredentials()) != 0 {
		t.Errorf("a refused batch stored %d credentials (%v)", len(list.GetCredentials()), err)
	}
}

// countingTransit counts the transit calls a batch makes.
type countingTransit struct {
	transit.Rotatable
	batcher transit.Batcher
	mu      sync.Mutex
	calls   map[string][]int // op → items per call
}

func (c *countingTransit) count(op string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls[op] = append(c.calls[op], n)
}

func (c *countingTransit) EncryptEach(ctx context.Context, items []transit.TenantItem) ([]transit.ItemResult, error) {
	c.count("encrypt", len(items))
	return c.batcher.EncryptEach(ctx, items)
}

func (c *countingTransit) DecryptEach(ctx context.Context, items []transit.TenantItem) ([]transit.ItemResult, error) {
	c.count("decrypt", len(items))
	return c.batcher.DecryptEach(ctx, items)
}

func (c *countingTransit) HMACEach(ctx context.Context, inputs [][]byte) ([]transit.ItemResult, error) {
	c.count("hmac", len(inputs))
	return c.batcher.HMACEach(ctx, inputs)
}

func (c *countingTransit) Encrypt(ctx context.Context, tenant string, items []transit.Item) ([]string, error) {
	c.count("encrypt", len(items))
	return c.Rotatable.Encrypt(ctx, tenant, items)
}

func (c *countingTransit) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	c.count("hmac", 1)
	return c.Rotatable.HMAC(ctx, data)
}

// TestBatchPutSharesTransitCalls: a batch of 250 items is sealed in a few
// transit calls of up to 100 items each, not in 500 calls.
func TestBatchPutSharesTransitCalls(t *testing.T) {
	h := newHarness(t, backends()[1])
	ct := &countingTransit{Rotatable: h.transit, batcher: h.transit.(transit.Batcher), calls: map[string][]int{}}
	r := &harness{transit: ct, sim: h.sim, simURL: h.simURL, logs: h.logs, rdb: h.rdb, prefix: h.prefix, keys: h.keys}
	r.start(t, harnessOptions{})
	req := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme", SkipValidation: true}
	for i := range 250 {
		req.Items = append(req.Items, r.wialonItem(fmt.Sprintf("c%03d", i), canaryToken))
	}
	resp, err := r.creds.BatchPutCredentials(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	for _, res := range resp.GetResults() {
		if res.GetError() != nil {
			t.Fatalf("%s: %v", res.GetCredentialId(), res.GetError())
		}
	}
	for _, op := range []string{"encrypt", "hmac"} {
		if got := ct.calls[op]; fmt.Sprint(got) != "[100 100 50]" && fmt.Sprint(got) != "[100 50 100]" && fmt.Sprint(got) != "[50 100 100]" {
			t.Errorf("%s calls carried %v items, want three calls of 100, 100 and 50", op, got)
		}
	}
}

// TestBatchPutValidationKeepsToTheLoginLimit: validating a batch of Wialon
// tokens goes through the login guard: past the egress group's budget of
// logins a minute, the items that cannot log in within the call's deadline
// fail with RESOURCE_EXHAUSTED and a time to wait, and store nothing.
func TestBatchPutValidationKeepsToTheLoginLimit(t *testing.T) {
	h := newHarness(t, backends()[1], func(c *app.CredentialsConfig) { c.WialonLoginLimit = 3 })
	before := h.sim.Stats().WialonLogins
	req := &credentialsv1.BatchPutCredentialsRequest{TenantId: "acme"}
	for i := range 6 {
		req.Items = append(req.Items, h.wialonItem(fmt.Sprintf("w%d", i), canaryToken))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	resp, err := h.creds.BatchPutCredentials(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	stored, limited := 0, 0
	for _, r := range resp.GetResults() {
		switch e := r.GetError(); {
		case e == nil:
			stored++
		case codes.Code(e.GetCode()) == codes.ResourceExhausted && e.GetReason() == apierr.ReasonUpstreamRateLimited && e.GetRetryAfter().AsDuration() > 0:
			limited++
			if _, err := h.store.GetCredential(context.Background(), "acme", r.GetCredentialId()); err != store.ErrNotFound {
				t.Errorf("%s was stored though its validation never ran: %v", r.GetCredentialId(), err)
			}
		default:
			t.Errorf("%s: %v", r.GetCredentialId(), e)
		}
	}
	if stored != 3 || limited != 3 {
		t.Errorf("%d stored and %d limited, want 3 and 3 (a budget of 3 logins a minute)", stored, limited)
	}
	if logins := h.sim.Stats().WialonLogins - before; logins != 3 {
		t.Errorf("Wialon saw %d logins, want 3", logins)
	}
}
