package transit

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// TenantItem is one item of a batch whose items may belong to different
// tenants: Vault's batch_input carries a derivation context (and associated
// data) per item.
type TenantItem struct {
	Tenant string
	Item
}

// ItemResult is one item's outcome in a batch: its Ciphertext (encrypt),
// Plaintext (decrypt) or MAC (hmac), or Err if this item failed. One item's
// failure does not fail the others. Err wraps ErrInvalid, ErrDecrypt or
// ErrUnavailable and says nothing about the item's content.
type ItemResult struct {
	Ciphertext string
	Plaintext  []byte
	MAC        []byte
	Err        error
}

// Batcher runs one backend call for the items of many tenants and reports
// each item's outcome apart. An error return fails the call as a whole
// (backend unreachable, key missing, request refused, an empty tenant); then
// there are no results. Vault and Keyring implement it; Batching needs it.
type Batcher interface {
	EncryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error)
	DecryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error)
	HMACEach(ctx context.Context, inputs [][]byte) ([]ItemResult, error)
}

// Defaults of BatchOptions.
const (
	DefaultBatchMaxItems    = 64
	DefaultBatchMaxInFlight = 2
)

// BatchOptions shape Batching. The zero value is the defaults.
type BatchOptions struct {
	// MaxItems is the most items one backend call carries (default
	// DefaultBatchMaxItems). A caller's own call of at least this many
	// items goes to the backend by itself, unbatched.
	MaxItems int
	// MaxInFlight is how many backend calls of one operation (encrypt,
	// decrypt, hmac) may be under way at once (default
	// DefaultBatchMaxInFlight). Items that arrive while that many are
	// under way wait, together, for the next free one: that is what makes
	// batches, and only under load.
	MaxInFlight int
	// MaxWait, if positive, holds a batch up to this long after its first
	// item for more items, even when a call could start at once. 0 (the
	// default) adds no wait: a lone item goes at once.
	MaxWait time.Duration
	// OnBatch, if set, is told the operation and item count of every
	// backend call Batching makes (for metrics and the benchmark). It must
	// not block.
	OnBatch func(op string, items int)
}

func (o BatchOptions) withDefaults() BatchOptions {
	if o.MaxItems <= 0 {
		o.MaxItems = DefaultBatchMaxItems
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultBatchMaxInFlight
	}
	o.MaxWait = max(o.MaxWait, 0)
	return o
}

// BatchingBackend is what Batching wraps: a Transit that can also run
// mixed-tenant batches. *Vault and *Keyring are both.
type BatchingBackend interface {
	Transit
	Batcher
}

// Batching is a Transit that coalesces concurrent Encrypt, Decrypt (and
// UnwrapDataKey) and HMAC calls into shared backend batch calls — Vault's
// batch_input — so callers under load share Vault round trips instead of
// queueing one each. Each operation has its own batches; items of different
// tenants share a batch, each with its own derivation context and
// associated data.
//
// Every caller gets exactly the answer its own call would have had: its
// ciphertexts, plaintexts or MACs in order, or an error if any of its own
// items failed (and then no plaintext), never because a neighbour's item
// failed. A failure of the backend call as a whole fails every caller in
// it. A caller's context bounds its own wait: a caller that gives up leaves
// its batch (before it is sent, its items are dropped; after, the answer is
// discarded and any plaintext zeroed); a batch whose callers have all left
// is cancelled. A batch call runs under a context of its own, without the
// callers' values, and with the latest of their deadlines.
//
// Rewrap and GenerateDataKey go to the backend unbatched.
type Batching struct {
	inner   BatchingBackend
	encrypt *coalescer
	decrypt *coalescer
	hmac    *coalescer
	opts    BatchOptions
}

var (
	_ Rotatable       = (*Batching)(nil)
	_ Batcher         = (*Batching)(nil)
	_ BatchingBackend = (*Vault)(nil)
	_ BatchingBackend = (*Keyring)(nil)
)

// NewBatching wraps inner.
func NewBatching(inner BatchingBackend, opts BatchOptions) *Batching {
	opts = opts.withDefaults()
	b := &Batching{inner: inner, opts: opts}
	b.encrypt = newCoalescer("encrypt", opts, inner.EncryptEach)
	b.decrypt = newCoalescer("decrypt", opts, inner.DecryptEach)
	b.hmac = newCoalescer("hmac", opts, func(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
		inputs := make([][]byte, len(items))
		for i, it := range items {
			inputs[i] = it.Plaintext
		}
		return inner.HMACEach(ctx, inputs)
	})
	return b
}

const batchingName = "transit (batched)"

// Encrypt encrypts items, sharing a backend call with concurrent callers.
func (b *Batching) Encrypt(ctx context.Context, tenant string, items []Item) ([]string, error) {
	if err := requireTenant(batchingName, "encrypt", tenant); err != nil {
		return nil, err
	}
	results, err := b.encrypt.do(ctx, withTenant(tenant, items))
	if err != nil {
		return nil, err
	}
	return ciphertexts(batchingName+" encrypt", results)
}

// Decrypt decrypts items, sharing a backend call with concurrent callers.
// If any of its items fails, no plaintext is returned.
func (b *Batching) Decrypt(ctx context.Context, tenant string, items []Item) ([][]byte, error) {
	if err := requireTenant(batchingName, "decrypt", tenant); err != nil {
		return nil, err
	}
	results, err := b.decrypt.do(ctx, withTenant(tenant, items))
	if err != nil {
		return nil, err
	}
	return plaintexts(batchingName+" decrypt", results)
}

// UnwrapDataKey decrypts a wrapped data key through the decrypt batches
// (a data key carries no associated data).
func (b *Batching) UnwrapDataKey(ctx context.Context, tenant string, wrapped string) ([]byte, error) {
	keys, err := b.Decrypt(ctx, tenant, []Item{{Ciphertext: wrapped}})
	if err != nil {
		return nil, err
	}
	return keys[0], nil
}

// HMAC computes the MAC of data, sharing a backend call with concurrent
// callers.
func (b *Batching) HMAC(ctx context.Context, data []byte) ([]byte, error) {
	results, err := b.hmac.do(ctx, []TenantItem{{Item: Item{Plaintext: data}}})
	if err != nil {
		return nil, err
	}
	if err := results[0].Err; err != nil {
		return nil, fmt.Errorf("%s hmac: %w", batchingName, err)
	}
	return results[0].MAC, nil
}

// EncryptEach encrypts items of any tenants, each with its own result
// (Batcher), sharing backend calls with concurrent callers: a call of at
// least MaxItems items goes to the backend by itself.
func (b *Batching) EncryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	if err := requireTenants(batchingName, "encrypt", items); err != nil {
		return nil, err
	}
	return b.encrypt.do(ctx, items)
}

// DecryptEach decrypts items of any tenants, each with its own result
// (Batcher), sharing backend calls with concurrent callers.
func (b *Batching) DecryptEach(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	if err := requireTenants(batchingName, "decrypt", items); err != nil {
		return nil, err
	}
	return b.decrypt.do(ctx, items)
}

// HMACEach computes the MAC of each input, each with its own result
// (Batcher), sharing backend calls with concurrent callers.
func (b *Batching) HMACEach(ctx context.Context, inputs [][]byte) ([]ItemResult, error) {
	items := make([]TenantItem, len(inputs))
	for i, in := range inputs {
		items[i] = TenantItem{Item: Item{Plaintext: in}}
	}
	return b.hmac.do(ctx, items)
}

// Rewrap goes to the backend unbatched: it is a bulk operation already.
func (b *Batching) Rewrap(ctx context.Context, tenant string, items []Item) ([]string, error) {
	return b.inner.Rewrap(ctx, tenant, items)
}

// GenerateDataKey goes to the backend unbatched: Vault has no batch form of
// datakey.
func (b *Batching) GenerateDataKey(ctx context.Context, tenant string) (DataKey, error) {
	return b.inner.GenerateDataKey(ctx, tenant)
}

// RotateKey rotates the backend's key, if it can be rotated.
func (b *Batching) RotateKey(ctx context.Context) error {
	r, ok := b.inner.(Rotatable)
	if !ok {
		return fmt.Errorf("%s rotate key: the backend cannot rotate keys: %w", batchingName, ErrInvalid)
	}
	return r.RotateKey(ctx)
}

// coalescer gathers the concurrent calls of one operation into backend
// batch calls: at most opts.MaxInFlight at once, each of at most
// opts.MaxItems items, each call's items kept together and in order.
type coalescer struct {
	op   string
	opts BatchOptions
	run  func(ctx context.Context, items []TenantItem) ([]ItemResult, error)

	mu       sync.Mutex
	queue    []*pending // waiting for a batch, oldest first
	queued   int        // items in queue
	inFlight int
	timer    *time.Timer // armed while the head of the queue lingers (MaxWait)
}

// pending is one caller's call.
type pending struct {
	items    []TenantItem // the batcher's own copies
	since    time.Time
	deadline time.Time // zero: none
	done     chan struct{}
	// Set by the batch before done is closed.
	results []ItemResult
	err     error
	// Under coalescer.mu: the batch carrying it (nil while queued), and
	// whether its caller stopped waiting.
	batch *sentBatch
	gone  bool
}

// sentBatch is a backend call under way.
type sentBatch struct {
	waiting int // callers still waiting for it
	cancel  context.CancelFunc
}

func newCoalescer(op string, opts BatchOptions, run func(context.Context, []TenantItem) ([]ItemResult, error)) *coalescer {
	return &coalescer{op: op, opts: opts, run: run}
}

// do runs items (one caller's call) in a batch and returns their results in
// order; an error means the whole backend call failed or the caller's
// context ended first.
func (c *coalescer) do(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	if len(items) == 0 {
		return []ItemResult{}, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, c.gaveUp(err)
	}
	if len(items) >= c.opts.MaxItems {
		return c.direct(ctx, items)
	}
	p := &pending{items: copyItems(items), since: time.Now(), done: make(chan struct{})}
	p.deadline, _ = ctx.Deadline()
	c.mu.Lock()
	c.queue = append(c.queue, p)
	c.queued += len(p.items)
	c.dispatchLocked()
	c.mu.Unlock()

	select {
	case <-p.done:
		return p.results, p.err
	case <-ctx.Done():
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-p.done: // answered meanwhile: better than an error
		return p.results, p.err
	default:
	}
	p.gone = true
	if p.batch == nil {
		c.queue = slices.DeleteFunc(c.queue, func(q *pending) bool { return q == p })
		c.queued -= len(p.items)
		zeroItems(p.items)
	} else if p.batch.waiting--; p.batch.waiting == 0 {
		p.batch.cancel()
	}
	return nil, c.gaveUp(ctx.Err())
}

func (c *coalescer) gaveUp(err error) error {
	return fmt.Errorf("%s %s: %w: %w", batchingName, c.op, ErrUnavailable, err)
}

// direct sends a call too big to share on its own.
func (c *coalescer) direct(ctx context.Context, items []TenantItem) ([]ItemResult, error) {
	if c.opts.OnBatch != nil {
		c.opts.OnBatch(c.op, len(items))
	}
	results, err := c.run(ctx, items)
	if err == nil && len(results) != len(items) {
		return nil, fmt.Errorf("%s %s: %d results for %d items: %w", batchingName, c.op, len(results), len(items), ErrUnavailable)
	}
	return results, err
}

// dispatchLocked starts batches while a call slot is free and the queue
// holds items that may go: at once, or after lingering MaxWait unless a
// full batch is waiting.
func (c *coalescer) dispatchLocked() {
	for c.inFlight < c.opts.MaxInFlight && len(c.queue) > 0 {
		if wait := c.lingerLocked(); wait > 0 {
			if c.timer == nil {
				c.timer = time.AfterFunc(wait, c.lingerDone)
			}
			return
		}
		n, items := 0, 0
		for n < len(c.queue) && (n == 0 || items+len(c.queue[n].items) <= c.opts.MaxItems) {
			items += len(c.queue[n].items)
			n++
		}
		batch := slices.Clone(c.queue[:n])
		c.queue = slices.Delete(c.queue, 0, n)
		c.queued -= items
		c.inFlight++
		c.start(batch, items)
	}
}

// lingerLocked is how much longer the head of the queue should wait for
// company (0: send now).
func (c *coalescer) lingerLocked() time.Duration {
	if c.opts.MaxWait <= 0 || c.queued >= c.opts.MaxItems {
		return 0
	}
	return max(c.opts.MaxWait-time.Since(c.queue[0].since), 0)
}

func (c *coalescer) lingerDone() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.timer = nil
	c.dispatchLocked()
}

// start sends batch (under c.mu) in a goroutine of its own.
func (c *coalescer) start(batch []*pending, n int) {
	ctx, cancel := batchContext(batch)
	sb := &sentBatch{waiting: len(batch), cancel: cancel}
	items := make([]TenantItem, 0, n)
	for _, p := range batch {
		p.batch = sb
		items = append(items, p.items...)
	}
	if c.opts.OnBatch != nil {
		c.opts.OnBatch(c.op, n)
	}
	go func() {
		results, err := c.run(ctx, items)
		cancel()
		if err == nil && len(results) != len(items) {
			err = fmt.Errorf("%s %s: %d results for %d items: %w", batchingName, c.op, len(results), len(items), ErrUnavailable)
		}
		c.finish(batch, results, err)
	}()
}

// batchContext is the context of a backend call: none of the callers'
// values or cancellation (each caller's own context bounds only its own
// wait), and the latest of their deadlines if every one of them has one.
func batchContext(batch []*pending) (context.Context, context.CancelFunc) {
	var latest time.Time
	for _, p := range batch {
		if p.deadline.IsZero() {
			return context.WithCancel(context.Background())
		}
		if p.deadline.After(latest) {
			latest = p.deadline
		}
	}
	return context.WithDeadline(context.Background(), latest)
}

// finish hands each caller its slice of the results, zeroes what no one
// will read, and lets the next batch go.
func (c *coalescer) finish(batch []*pending, results []ItemResult, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inFlight--
	off := 0
	for _, p := range batch {
		n := len(p.items)
		zeroItems(p.items)
		if err != nil {
			p.err = err
		} else {
			p.results = results[off : off+n : off+n]
			if p.gone {
				zeroResults(p.results)
			}
		}
		off += n
		close(p.done)
	}
	c.dispatchLocked()
}

// copyItems copies the caller's plaintexts and associated data, so a caller
// that gives up may reuse or wipe its buffers while its batch is sent.
func copyItems(items []TenantItem) []TenantItem {
	out := make([]TenantItem, len(items))
	for i, it := range items {
		out[i] = TenantItem{Tenant: it.Tenant, Item: Item{
			AssociatedData: slices.Clone(it.AssociatedData),
			Plaintext:      slices.Clone(it.Plaintext),
			Ciphertext:     it.Ciphertext,
		}}
	}
	return out
}

func zeroItems(items []TenantItem) {
	for _, it := range items {
		clear(it.Plaintext)
	}
}

func zeroResults(results []ItemResult) {
	for _, r := range results {
		clear(r.Plaintext)
		clear(r.MAC)
	}
}

// withTenant makes items of one tenant into TenantItems.
func withTenant(tenant string, items []Item) []TenantItem {
	out := make([]TenantItem, len(items))
	for i, it := range items {
		out[i] = TenantItem{Tenant: tenant, Item: it}
	}
	return out
}

// requireTenants rejects a batch with an item of the empty tenant.
func requireTenants(impl, op string, items []TenantItem) error {
	for _, it := range items {
		if err := requireTenant(impl, op, it.Tenant); err != nil {
			return err
		}
	}
	return nil
}

// ciphertexts turns one call's encrypt results into its answer: every
// ciphertext in order, or the first failed item's error.
func ciphertexts(name string, results []ItemResult) ([]string, error) {
	out := make([]string, len(results))
	for i, r := range results {
		if r.Err != nil {
			return nil, fmt.Errorf("%s: item %d: %w", name, i, r.Err)
		}
		out[i] = r.Ciphertext
	}
	return out, nil
}

// plaintexts turns one call's decrypt results into its answer: every
// plaintext in order, or, if any item failed, its error and no plaintext
// (the others are zeroed).
func plaintexts(name string, results []ItemResult) ([][]byte, error) {
	for i, r := range results {
		if r.Err != nil {
			zeroResults(results)
			return nil, fmt.Errorf("%s: item %d: %w", name, i, r.Err)
		}
	}
	out := make([][]byte, len(results))
	for i, r := range results {
		out[i] = r.Plaintext
	}
	return out, nil
}
