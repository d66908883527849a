package bench

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

const cpTenant = "bench-cp"

// Control-plane operations.
const (
	opIssue   = "IssueSession"
	opResolve = "ResolveSession"
	opPut     = "PutCredential"
	// opNoop is a unary method that does nothing, through the same server,
	// interceptors and TLS as the credentials service (noop.go).
	opNoop = "no-op unary (reference)"
	// opBatchPut is BatchPutCredentials of batchPutItems credentials with
	// skip_validation, replacing a bounded set of credentials.
	opBatchPut     = "BatchPutCredentials"
	opRedisGet     = "redis GET (reference)"
	opEncrypt1     = "transit encrypt (1 item/call)"
	opEncryptBatch = "transit encrypt (batch of 100)"
	// opSeal is PutCredential's transit work alone (an encrypt and an
	// HMAC) through transit.Batching: sequential, as the credentials
	// service does it, or both at once.
	opSeal = "transit encrypt+hmac (batched)"
)

// Variants of opSeal.
const (
	sealSequential = "sequential"
	sealConcurrent = "concurrent"
)

// refVariant is the variant name of the reference rows, which call Redis or
// transit directly.
const refVariant = "direct"

// ControlRow is one operation by one variant at one concurrency: medians
// over interleaved rounds.
type ControlRow struct {
	Op      string `json:"op"`
	Variant string `json:"variant"`
	Callers int    `json:"callers"`
	// ItemsPerCall is the transit batch size (1 for RPCs).
	ItemsPerCall int     `json:"items_per_call"`
	ItemsPerSec  float64 `json:"items_per_s"`
	Summary      Summary `json:"summary"`
	// Base is the variant this one adds a piece to (none for plain and the
	// reference rows); ThroughputVsBase and AddedCPUVsBaseUs are the median
	// over rounds of this variant's throughput over Base's, and its CPU per
	// call minus Base's: what the added piece costs.
	Base             string  `json:"base,omitempty"`
	ThroughputVsBase float64 `json:"throughput_vs_base,omitempty"`
	AddedCPUVsBaseUs float64 `json:"added_cpu_vs_base_us,omitempty"`
	// ThroughputVsPlain is over the plain variant of the same operation.
	ThroughputVsPlain float64 `json:"throughput_vs_plain,omitempty"`
	// ItemsVsEncryptBatch (BatchPutCredentials) is its items per second
	// over transit's own batch-of-100 encrypt, at the same concurrency,
	// paired by round: the bulk import target.
	ItemsVsEncryptBatch float64 `json:"items_vs_transit_encrypt_batch,omitempty"`
	// ThroughputVsNoop (IssueSession, ResolveSession) is over the no-op
	// unary method served by the same variant, paired by round: the
	// handles target.
	ThroughputVsNoop float64 `json:"throughput_vs_noop,omitempty"`
	// ThroughputVsEncrypt1 (PutCredential only) is over transit's
	// single-item encrypt rate at the same concurrency, paired by round:
	// the transit batching target.
	ThroughputVsEncrypt1 float64 `json:"throughput_vs_transit_encrypt_1,omitempty"`
	// TransitCallsPerCall and ItemsPerTransitCall are the batching of the
	// plain+batch variant (the one whose transit the bench builds): Vault
	// transit requests per PutCredential (2 without batching), and items
	// per request.
	TransitCallsPerCall float64 `json:"transit_calls_per_call,omitempty"`
	ItemsPerTransitCall float64 `json:"items_per_transit_call,omitempty"`
	// At the production level, the audit trail's group commit over the
	// measurements: records per fsync, fsyncs per call, and the mean time
	// of one fsync.
	AuditRecordsPerSync float64 `json:"audit_records_per_sync,omitempty"`
	AuditSyncsPerCall   float64 `json:"audit_syncs_per_call,omitempty"`
	AuditSyncMs         float64 `json:"audit_sync_ms,omitempty"`
}

// ControlReport is the control-plane phase.
type ControlReport struct {
	// Transit is what encrypts: "vault" (a real Vault 1.21 dev server) or
	// "dev-keyring" (-no-vault).
	Transit string `json:"transit"`
	Rounds  int    `json:"rounds"`
	// TransitBatch is the batching of plain+batch and production.
	TransitBatch string       `json:"transit_batch"`
	Rows         []ControlRow `json:"rows"`
}

// transitBatch is the batch size of the batch-encrypt figure.
const transitBatch = 100

// controlOp is one operation and the variants it runs in.
type controlOp struct {
	name     string
	items    int
	variants []string
	op       func(variant string) (Op, error)
}

// controlBase says which variant each variant adds a piece to, in order of
// preference (the first one the operation runs).
var controlBase = map[string][]string{
	credPlainBatch:        {lvlPlain},
	lvlTLS:                {lvlPlain},
	lvlPolicy:             {lvlTLS},
	lvlLimits:             {lvlPolicy},
	credProductionNoBatch: {lvlLimits},
	lvlProduction:         {credProductionNoBatch, lvlLimits},
}

// runControl measures IssueSession and ResolveSession (Redis only, no
// Vault on either) and PutCredential (one transit encrypt and one transit
// HMAC per call, plus Redis) through every credentials-service variant, a
// bare Redis GET for reference, and transit encrypt itself, one item per
// call against a batch per call. Rounds are interleaved like the overhead
// phase's: each round runs, per operation and concurrency, every variant
// back to back.
func runControl(ctx context.Context, e *env, opts Options, sim *simHTTP) (*ControlReport, error) {
	rep := &ControlReport{Transit: "vault", Rounds: opts.Rounds,
		TransitBatch: fmt.Sprintf("size %d, calls %d, wait %s", opts.TransitBatch.MaxItems, opts.TransitBatch.MaxInFlight, opts.TransitBatch.MaxWait)}
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

	// IssueSession and ResolveSession make no transit call: they run at
	// the security levels only.
	var rpcVariants, putVariants, batchVariants []string
	for _, v := range credsVariants {
		if v.name != lvlPlain && (opts.NoProduction || (e.vault == nil && needsBuilders(v.level))) {
			continue
		}
		putVariants = append(putVariants, v.name)
		if v.name != credPlainBatch && v.name != credProductionNoBatch {
			rpcVariants = append(rpcVariants, v.name)
		}
		if v.name == lvlPlain || v.name == lvlProduction {
			batchVariants = append(batchVariants, v.name)
		}
	}
	var seq atomic.Int64
	plain := []byte(a.token)
	service := func(variant string) (*credsService, error) {
		return e.credentialsVariant(ctx, credsVariantNamed(variant))
	}
	ops := []controlOp{
		{opIssue, 1, rpcVariants, func(v string) (Op, error) {
			s, err := service(v)
			if err != nil {
				return nil, err
			}
			return func(ctx context.Context, _ int) error {
				_, err := s.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: cpTenant, CredentialId: a.credID, Ttl: durationpb.New(10 * time.Minute)})
				return err
			}, nil
		}},
		{opResolve, 1, rpcVariants, func(v string) (Op, error) {
			s, err := service(v)
			if err != nil {
				return nil, err
			}
			return func(ctx context.Context, _ int) error {
				_, err := s.resolver.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: handles[seq.Add(1)%nHandles]})
				return err
			}, nil
		}},
		{opNoop, 1, rpcVariants, func(v string) (Op, error) {
			s, err := service(v)
			if err != nil {
				return nil, err
			}
			return func(ctx context.Context, _ int) error { return callNoop(ctx, s.conn) }, nil
		}},
		{opPut, 1, putVariants, func(v string) (Op, error) {
			s, err := service(v)
			if err != nil {
				return nil, err
			}
			return func(ctx context.Context, _ int) error {
				b := a
				b.credID = "put-" + strconv.FormatInt(seq.Add(1), 10)
				return putVia(ctx, s.creds, cpTenant, b, sim.url)
			}, nil
		}},
		{opBatchPut, batchPutItems, batchVariants, func(v string) (Op, error) {
			s, err := service(v)
			if err != nil {
				return nil, err
			}
			return func(ctx context.Context, _ int) error {
				return batchPutVia(ctx, s.creds, cpTenant, a, sim.url, seq.Add(1))
			}, nil
		}},
		// A reference, not a fleetbroker call: what one Redis round trip
		// costs on this machine (the gateway makes one per Wialon call and
		// two per FleetUp call on its hot path).
		{opRedisGet, 1, []string{refVariant}, func(string) (Op, error) {
			return func(ctx context.Context, _ int) error {
				err := e.rdb.Get(ctx, "fbbench:reference").Err()
				if errors.Is(err, redis.Nil) {
					err = nil
				}
				return err
			}, nil
		}},
		{opEncrypt1, 1, []string{refVariant}, func(string) (Op, error) {
			return func(ctx context.Context, _ int) error {
				_, err := e.credTr.Encrypt(ctx, cpTenant, []transit.Item{{AssociatedData: []byte("bench"), Plaintext: plain}})
				return err
			}, nil
		}},
		{opEncryptBatch, transitBatch, []string{refVariant}, func(string) (Op, error) {
			return func(ctx context.Context, _ int) error {
				items := make([]transit.Item, transitBatch)
				for i := range items {
					items[i] = transit.Item{AssociatedData: []byte("bench" + strconv.Itoa(i)), Plaintext: plain}
				}
				_, err := e.credTr.Encrypt(ctx, cpTenant, items)
				return err
			}, nil
		}},
		{opSeal, 2, []string{sealSequential, sealConcurrent}, func(v string) (Op, error) {
			return e.sealOp(v, []byte(a.token)), nil
		}},
	}

	ops = slices.DeleteFunc(ops, func(o controlOp) bool {
		return len(opts.ControlOps) > 0 && !slices.Contains(opts.ControlOps, o.name)
	})
	for i := range ops {
		ops[i].variants = slices.DeleteFunc(slices.Clone(ops[i].variants), func(v string) bool {
			return v != refVariant && v != sealSequential && v != sealConcurrent && !opts.hasVariant(v)
		})
	}
	type key struct {
		op, variant string
		callers     int
	}
	results := map[key][]measured{}
	batching := map[key][2]int64{} // plain+batch PutCredential: transit calls, items
	syncs := map[key]audit.SyncStats{}
	built := map[key]Op{}
	for round := range opts.Rounds {
		for _, o := range ops {
			for _, c := range opts.ControlConcurrency {
				for _, v := range o.variants {
					if ctx.Err() != nil {
						return rep, ctx.Err()
					}
					k := key{o.name, v, 0}
					op, ok := built[k]
					if !ok {
						var err error
						if op, err = o.op(v); err != nil {
							return nil, err
						}
						built[k] = op
					}
					var counter *batchCounter
					if o.name == opPut && v == credPlainBatch {
						s, _ := service(v)
						counter = s.batches
					}
					var trail *audit.Logger
					if v != refVariant && v != sealSequential && v != sealConcurrent {
						s, _ := service(v)
						trail = s.audit
					}
					calls0, items0 := counter.load()
					sync0 := syncStats(trail)
					m := measureLoad(ctx, opts.load(c), op, e.procs())
					calls1, items1 := counter.load()
					sync1 := syncStats(trail)
					k.callers = c
					results[k] = append(results[k], m)
					st := syncs[k]
					st.Syncs += sync1.Syncs - sync0.Syncs
					st.Lines += sync1.Lines - sync0.Lines
					st.Time += sync1.Time - sync0.Time
					syncs[k] = st
					if counter != nil {
						b := batching[k]
						b[0] += calls1 - calls0
						b[1] += items1 - items0
						batching[k] = b
					}
					opts.progress(fmt.Sprintf("control round %d/%d  %-30s %-18s %3d callers  %8.0f calls/s  p50 %7.3f ms  p99 %7.3f ms  cpu/call %5.0f+%3.0f+%4.0f µs  errors %d",
						round+1, opts.Rounds, o.name, v, c, m.Throughput, m.P50ms, m.P99ms, m.CPUPerCallUs, m.RedisCPUPerCallUs, m.VaultCPUPerCallUs, m.Errors))
				}
			}
		}
	}

	for _, o := range ops {
		for _, c := range opts.ControlConcurrency {
			sum := func(v string) Summary { return summarize(results[key{o.name, v, c}]) }
			plainSum := sum(lvlPlain)
			for _, v := range o.variants {
				s := sum(v)
				row := ControlRow{Op: o.name, Variant: v, Callers: c, ItemsPerCall: o.items, ItemsPerSec: s.Throughput * float64(o.items), Summary: s}
				for _, base := range controlBase[v] {
					if b := sum(base); len(b.Rounds) > 0 {
						row.Base, row.ThroughputVsBase, row.AddedCPUVsBaseUs = base, pairedThroughput(s, b), pairedAddedCPU(s, b)
						break
					}
				}
				if v != lvlPlain && len(plainSum.Rounds) > 0 {
					row.ThroughputVsPlain = pairedThroughput(s, plainSum)
				}
				if o.name == opIssue || o.name == opResolve {
					if n := summarize(results[key{opNoop, v, c}]); len(n.Rounds) > 0 {
						row.ThroughputVsNoop = pairedThroughput(s, n)
					}
				}
				if o.name == opBatchPut {
					row.ItemsVsEncryptBatch = pairedThroughput(s, summarize(results[key{opEncryptBatch, refVariant, c}])) * float64(batchPutItems) / transitBatch
				}
				if o.name == opPut || o.name == opSeal {
					row.ThroughputVsEncrypt1 = pairedThroughput(s, summarize(results[key{opEncrypt1, refVariant, c}]))
				}
				if v == sealConcurrent {
					b := sum(sealSequential)
					row.Base, row.ThroughputVsBase, row.AddedCPUVsBaseUs = sealSequential, pairedThroughput(s, b), pairedAddedCPU(s, b)
				}
				var total int64
				for _, m := range s.Rounds {
					total += m.TotalOps
				}
				if st := syncs[key{o.name, v, c}]; st.Syncs > 0 {
					row.AuditRecordsPerSync = div(float64(st.Lines), float64(st.Syncs))
					row.AuditSyncsPerCall = div(float64(st.Syncs), float64(total))
					row.AuditSyncMs = div(float64(st.Time)/1e6, float64(st.Syncs))
				}
				if b := batching[key{o.name, v, c}]; b[0] > 0 {
					row.TransitCallsPerCall = div(float64(b[0]), float64(total))
					row.ItemsPerTransitCall = div(float64(b[1]), float64(b[0]))
				}
				rep.Rows = append(rep.Rows, row)
			}
		}
	}
	return rep, nil
}

// sealOp is PutCredential's transit work on its own, through the run's
// transit batching: an encrypt bound to tenant and credential, and an HMAC
// fingerprint, one after the other (sequential) or at once (concurrent).
func (e *env) sealOp(variant string, plain []byte) Op {
	tr := e.sealTransit()
	var seq atomic.Int64
	return func(ctx context.Context, _ int) error {
		aad := []byte("bench/seal/" + strconv.FormatInt(seq.Add(1), 10))
		encrypt := func() error {
			_, err := tr.Encrypt(ctx, cpTenant, []transit.Item{{AssociatedData: aad, Plaintext: plain}})
			return err
		}
		mac := func() error {
			_, err := tr.HMAC(ctx, append([]byte(cpTenant+"\x00wialon\x00"), plain...))
			return err
		}
		if variant == sealSequential {
			if err := encrypt(); err != nil {
				return err
			}
			return mac()
		}
		errc := make(chan error, 1)
		go func() { errc <- mac() }()
		return errors.Join(encrypt(), <-errc)
	}
}

// sealTransit is the batching transit of opSeal, made once.
func (e *env) sealTransit() *transit.Batching {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sealTr == nil {
		e.sealTr = transit.NewBatching(e.credTr.(transit.BatchingBackend), e.opts.TransitBatch)
	}
	return e.sealTr
}

// putVia stores a through creds as a credential of tenant, without asking
// the provider.
func putVia(ctx context.Context, creds credentialsv1.CredentialServiceClient, tenant string, a account, baseURL string) error {
	if _, err := creds.PutCredential(ctx, putRequest(tenant, a, baseURL)); err != nil {
		return fmt.Errorf("put credential %s/%s: %w", tenant, a.credID, err)
	}
	return nil
}

// syncStats reads a trail's sync statistics (zero for none).
func syncStats(l *audit.Logger) audit.SyncStats {
	if l == nil {
		return audit.SyncStats{}
	}
	return l.SyncStats()
}

// batchPutItems is how many credentials each BatchPutCredentials of the
// control phase carries, and batchPutSets how many distinct batches of
// credentials it cycles through (replacing them), so Redis stays small.
const (
	batchPutItems = 100
	batchPutSets  = 200
)

// batchPutVia stores a's secret under batchPutItems credential ids of set
// n (mod batchPutSets) of tenant in one BatchPutCredentials, without asking
// the provider, and fails if any item did.
func batchPutVia(ctx context.Context, creds credentialsv1.CredentialServiceClient, tenant string, a account, baseURL string, n int64) error {
	req := &credentialsv1.BatchPutCredentialsRequest{TenantId: tenant, SkipValidation: true, Items: make([]*credentialsv1.BatchPutItem, batchPutItems)}
	set := n % batchPutSets
	for i := range req.Items {
		one := putRequest(tenant, a, baseURL)
		item := &credentialsv1.BatchPutItem{CredentialId: fmt.Sprintf("bulk-%03d-%03d", set, i)}
		switch sec := one.GetSecret().(type) {
		case *credentialsv1.PutCredentialRequest_Wialon:
			item.Secret = &credentialsv1.BatchPutItem_Wialon{Wialon: sec.Wialon}
		case *credentialsv1.PutCredentialRequest_Fleetup:
			item.Secret = &credentialsv1.BatchPutItem_Fleetup{Fleetup: sec.Fleetup}
		}
		req.Items[i] = item
	}
	resp, err := creds.BatchPutCredentials(ctx, req)
	if err != nil {
		return fmt.Errorf("batch put: %w", err)
	}
	for _, r := range resp.GetResults() {
		if e := r.GetError(); e != nil {
			return fmt.Errorf("batch put %s: %s %s", r.GetCredentialId(), e.GetReason(), e.GetMessage())
		}
	}
	return nil
}
