package credentials_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// rendezvousTransit lets an Encrypt or an HMAC finish only once the other
// has started too: a put that runs them one after the other never gets
// its first call answered (it fails after a few seconds), one that runs
// them at once goes through.
type rendezvousTransit struct {
	transit.Rotatable
	encrypting, hmacing chan struct{}
}

func newRendezvousTransit(inner transit.Rotatable) *rendezvousTransit {
	return &rendezvousTransit{Rotatable: inner, encrypting: make(chan struct{}), hmacing: make(chan struct{})}
}

var errAlone = errors.New("rendezvous transit: the other call never started")

func (r *rendezvousTransit) meet(mine, other chan struct{}) error {
	close(mine)
	select {
	case <-other:
		return nil
	case <-time.After(5 * time.Second):
		return errAlone
	}
}

func (r *rendezvousTransit) Encrypt(ctx context.Context, tenant string, items []transit.Item) ([]string, error) {
	if err := r.meet(r.encrypting, r.hmacing); err != nil {
		return nil, err
	}
	return r.Rotatable.Encrypt(ctx, tenant, items)
}

func (r *rendezvousTransit) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	if err := r.meet(r.hmacing, r.encrypting); err != nil {
		return nil, err
	}
	return r.Rotatable.HMAC(ctx, data)
}

// TestPutSealsWithOneTransitRoundTrip: PutCredential runs the encrypt and
// the HMAC of the secret at once, so its critical path waits for one
// transit round trip, not two in a row.
func TestPutSealsWithOneTransitRoundTrip(t *testing.T) {
	h := newHarness(t, backends()[1])
	r := &harness{transit: newRendezvousTransit(h.transit), sim: h.sim, simURL: h.simURL, logs: h.logs, rdb: h.rdb, prefix: h.prefix, keys: h.keys}
	r.start(t, harnessOptions{})
	put := r.wialonPut("acme", "sealed-at-once")
	put.SkipValidation = true
	resp, err := r.creds.PutCredential(context.Background(), put)
	if err != nil {
		t.Fatalf("PutCredential with an encrypt and an HMAC that must overlap: %v", err)
	}
	if resp.GetCredential().GetFingerprint() == "" {
		t.Error("stored without a fingerprint")
	}
	stored, err := r.store.GetCredential(context.Background(), "acme", "sealed-at-once")
	if err != nil || stored.Ciphertext == "" {
		t.Fatalf("stored record: %v, ciphertext %d bytes", err, len(stored.Ciphertext))
	}
	r.assertNoCanary(t, err)
}
