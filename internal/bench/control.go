package bench

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

const cpTenant = "bench-cp"

// ControlRow is one control-plane operation at one concurrency.
type ControlRow struct {
	Op      string `json:"op"`
	Callers int    `json:"callers"`
	// ItemsPerCall is the transit batch size (1 for RPCs).
	ItemsPerCall int     `json:"items_per_call"`
	ItemsPerSec  float64 `json:"items_per_s"`
	Result       Result  `json:"result"`
}

// ControlReport is the control-plane phase.
type ControlReport struct {
	// Transit is what encrypts: "vault" (a real Vault 1.21 dev server) or
	// "dev-keyring" (-no-vault).
	Transit string       `json:"transit"`
	Rows    []ControlRow `json:"rows"`
}

// transitBatch is the batch size of the batch-encrypt figure.
const transitBatch = 100

// runControl measures IssueSession and ResolveSession (Redis only, no
// Vault on either), PutCredential (one transit encrypt and one transit HMAC
// per call, plus Redis), a bare Redis GET for reference, and transit
// encrypt itself, one item per call against a batch per call: what a batch
// PutCredential could gain.
func runControl(ctx context.Context, e *env, opts Options, sim *simHTTP) (*ControlReport, error) {
	rep := &ControlReport{Transit: "vault"}
	if e.vault == nil {
		rep.Transit = "dev-keyring"
	}
	a := newAccount(sim.sim, provWialon, "ctrl", 0)
	if err := e.put(ctx, cpTenant, a, sim.url); err != nil {
		return nil, err
	}
	const nHandles = 1000
	handles := make([]string, nHandles)
	if err := parallel(ctx, nHandles, 16, func(ctx context.Context, i int) error {
		resp, err := e.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: cpTenant, CredentialId: a.credID, Ttl: durationpb.New(time.Hour)})
		handles[i] = resp.GetHandle()
		return err
	}); err != nil {
		return nil, err
	}
	var seq atomic.Int64
	plain := []byte(a.token)
	ops := []struct {
		name  string
		items int
		op    Op
	}{
		{"IssueSession", 1, func(ctx context.Context, _ int) error {
			_, err := e.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: cpTenant, CredentialId: a.credID, Ttl: durationpb.New(10 * time.Minute)})
			return err
		}},
		{"ResolveSession", 1, func(ctx context.Context, _ int) error {
			_, err := e.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: handles[seq.Add(1)%nHandles]})
			return err
		}},
		{"PutCredential", 1, func(ctx context.Context, _ int) error {
			b := a
			b.credID = "put-" + strconv.FormatInt(seq.Add(1), 10)
			return e.put(ctx, cpTenant, b, sim.url)
		}},
		// A reference, not a fleetbroker call: what one Redis round trip
		// costs on this machine (the gateway makes one per Wialon call and
		// two per FleetUp call on its hot path).
		{"redis GET (reference)", 1, func(ctx context.Context, _ int) error {
			err := e.rdb.Get(ctx, "fbbench:reference").Err()
			if errors.Is(err, redis.Nil) {
				err = nil
			}
			return err
		}},
		{"transit encrypt (1 item/call)", 1, func(ctx context.Context, _ int) error {
			_, err := e.credTr.Encrypt(ctx, cpTenant, []transit.Item{{AssociatedData: []byte("bench"), Plaintext: plain}})
			return err
		}},
		{fmt.Sprintf("transit encrypt (batch of %d)", transitBatch), transitBatch, func(ctx context.Context, _ int) error {
			items := make([]transit.Item, transitBatch)
			for i := range items {
				items[i] = transit.Item{AssociatedData: []byte("bench" + strconv.Itoa(i)), Plaintext: plain}
			}
			_, err := e.credTr.Encrypt(ctx, cpTenant, items)
			return err
		}},
	}
	for _, o := range ops {
		for _, c := range opts.ControlConcurrency {
			if ctx.Err() != nil {
				return rep, ctx.Err()
			}
			r := RunLoad(ctx, opts.load(c), o.op)
			row := ControlRow{Op: o.name, Callers: c, ItemsPerCall: o.items, ItemsPerSec: r.Throughput * float64(o.items), Result: r}
			opts.progress(fmt.Sprintf("control %-32s %3d callers  %9.0f calls/s  %9.0f items/s  p50 %7.3f ms  p99 %7.3f ms  errors %d",
				o.name, c, r.Throughput, row.ItemsPerSec, r.P50ms, r.P99ms, r.Errors))
			rep.Rows = append(rep.Rows, row)
		}
	}
	return rep, nil
}
