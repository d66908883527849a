package transit_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/transit/transittest"
)

// Batching is held to the same conformance suite as what it wraps, on the
// real Vault and on the dev keyring, with the default options and with a
// lingering, one-call-at-a-time shape.
func TestBatchingConformance(t *testing.T) {
	shapes := map[string]transit.BatchOptions{
		"defaults":  {},
		"lingering": {MaxItems: 3, MaxInFlight: 1, MaxWait: time.Millisecond},
	}
	for name, opts := range shapes {
		t.Run(name, func(t *testing.T) {
			t.Run("vault", func(t *testing.T) {
				srv := testenv.Vault(t)
				transittest.Run(t, func(t *testing.T) transit.Rotatable {
					v, _ := newKeyedVault(t, srv)
					return transit.NewBatching(v, opts)
				})
			})
			t.Run("keyring", func(t *testing.T) {
				transittest.Run(t, func(t *testing.T) transit.Rotatable {
					return transit.NewBatching(newKeyring(t), opts)
				})
			})
		})
	}
}

// gated is a backend that records every batch call and can hold calls
// until the test lets them go.
type gated struct {
	transit.BatchingBackend

	mu      sync.Mutex
	calls   []gatedCall
	hold    chan struct{} // while open, calls wait on it (nil: none do)
	entered chan string   // told the op of every call as it starts
	fail    error         // returned by every call as a whole, if set
}

type gatedCall struct {
	op    string
	items int
	// ctxDone is closed when the call's context ends.
	ctxDone <-chan struct{}
}

func newGated(inner transit.BatchingBackend) *gated {
	return &gated{BatchingBackend: inner, entered: make(chan string, 1000)}
}

// holdCalls makes every later call wait until the returned func is called.
func (g *gated) holdCalls() (release func()) {
	ch := make(chan struct{})
	g.mu.Lock()
	g.hold = ch
	g.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			g.hold = nil
			g.mu.Unlock()
			close(ch)
		})
	}
}

func (g *gated) enter(ctx context.Context, op string, n int) error {
	g.mu.Lock()
	g.calls = append(g.calls, gatedCall{op: op, items: n, ctxDone: ctx.Done()})
	hold, fail := g.hold, g.fail
	g.mu.Unlock()
	g.entered <- op
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return fmt.Errorf("gated %s: %w: %w", op, transit.ErrUnavailable, ctx.Err())
		}
	}
	return fail
}

func (g *gated) EncryptEach(ctx context.Context, items []transit.TenantItem) ([]transit.ItemResult, error) {
	if err := g.enter(ctx, "encrypt", len(items)); err != nil {
		return nil, err
	}
	return g.BatchingBackend.EncryptEach(ctx, items)
}

func (g *gated) DecryptEach(ctx context.Context, items []transit.TenantItem) ([]transit.ItemResult, error) {
	if err := g.enter(ctx, "decrypt", len(items)); err != nil {
		return nil, err
	}
	return g.BatchingBackend.DecryptEach(ctx, items)
}

func (g *gated) HMACEach(ctx context.Context, inputs [][]byte) ([]transit.ItemResult, error) {
	if err := g.enter(ctx, "hmac", len(inputs)); err != nil {
		return nil, err
	}
	return g.BatchingBackend.HMACEach(ctx, inputs)
}

func (g *gated) callLog() []gatedCall {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.calls)
}

// waitQueued waits until n items of op wait for a batch.
func waitQueued(t *testing.T, b *transit.Batching, op string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for transit.QueuedItems(b, op) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d %s items queued, want %d", transit.QueuedItems(b, op), op, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitEntered waits for the backend to start a call of op.
func waitEntered(t *testing.T, g *gated, op string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-g.entered:
			if got == op {
				return
			}
		case <-timeout:
			t.Fatalf("no %s call reached the backend", op)
		}
	}
}

type outcome struct {
	plaintexts [][]byte
	err        error
}

// Callers that arrive while a call is under way share the next one: with one
// call in flight, eight decrypts of three tenants (one of them with a bad
// item) go to the real Vault as one batch, and each caller gets exactly its
// own answer: the bad item fails only its own caller.
func TestBatchingCoalescesAndKeepsErrorsPerCaller(t *testing.T) {
	srv := testenv.Vault(t)
	v, _ := newKeyedVault(t, srv)
	g := newGated(v)
	b := transit.NewBatching(g, transit.BatchOptions{MaxInFlight: 1})
	ctx := t.Context()

	type call struct {
		tenant string
		items  []transit.Item
		want   [][]byte
		bad    bool
	}
	var calls []call
	for i := range 8 {
		tenant := []string{"tenant-a", "tenant-b", "tenant-c"}[i%3]
		plain := [][]byte{[]byte(fmt.Sprintf("secret %d/1 of %s", i, tenant)), []byte(fmt.Sprintf("secret %d/2", i))}
		items := []transit.Item{{Plaintext: plain[0], AssociatedData: []byte(tenant + "/cred-1")}, {Plaintext: plain[1], AssociatedData: []byte(tenant + "/cred-2")}}
		cts, err := v.Encrypt(ctx, tenant, items)
		if err != nil {
			t.Fatal(err)
		}
		c := call{tenant: tenant, want: plain}
		for j, it := range items {
			c.items = append(c.items, transit.Item{Ciphertext: cts[j], AssociatedData: it.AssociatedData})
		}
		if i == 5 { // its second item names the wrong credential
			c.items[1].AssociatedData = []byte(tenant + "/cred-other")
			c.bad = true
		}
		calls = append(calls, c)
	}

	release := g.holdCalls()
	defer release()
	first := make(chan outcome, 1)
	go func() {
		pts, err := b.Decrypt(ctx, calls[0].tenant, calls[0].items)
		first <- outcome{pts, err}
	}()
	waitEntered(t, g, "decrypt")
	results := make([]chan outcome, len(calls))
	for i := 1; i < len(calls); i++ {
		results[i] = make(chan outcome, 1)
		go func() {
			pts, err := b.Decrypt(ctx, calls[i].tenant, calls[i].items)
			results[i] <- outcome{pts, err}
		}()
	}
	waitQueued(t, b, "decrypt", 2*(len(calls)-1))
	release()
	results[0] = first

	for i, c := range calls {
		got := <-results[i]
		if c.bad {
			if !errors.Is(got.err, transit.ErrDecrypt) || got.plaintexts != nil {
				t.Errorf("call %d (bad item): %q, %v; want ErrDecrypt and no plaintext", i, got.plaintexts, got.err)
			}
			continue
		}
		if got.err != nil {
			t.Errorf("call %d: %v (a neighbour's bad item must not fail it)", i, got.err)
			continue
		}
		for j := range c.want {
			if !bytes.Equal(got.plaintexts[j], c.want[j]) {
				t.Errorf("call %d item %d: got %q, want %q", i, j, got.plaintexts[j], c.want[j])
			}
		}
	}
	var sizes []int
	for _, c := range g.callLog() {
		sizes = append(sizes, c.items)
	}
	if want := []int{2, 2 * (len(calls) - 1)}; !slices.Equal(sizes, want) {
		t.Errorf("backend calls carried %v items, want %v (the first call alone, then everyone queued behind it in one batch)", sizes, want)
	}
}

// Encrypt and HMAC coalesce the same way, and a coalesced HMAC equals the
// backend's own.
func TestBatchingCoalescesEncryptAndHMAC(t *testing.T) {
	srv := testenv.Vault(t)
	v, _ := newKeyedVault(t, srv)
	g := newGated(v)
	b := transit.NewBatching(g, transit.BatchOptions{MaxInFlight: 1})
	ctx := t.Context()
	for _, op := range []string{"encrypt", "hmac"} {
		t.Run(op, func(t *testing.T) {
			call := func(i int) ([]byte, error) {
				data := []byte(fmt.Sprintf("fingerprint input %d", i))
				if op == "hmac" {
					return b.HMAC(ctx, data)
				}
				tenant := fmt.Sprintf("tenant-%d", i%2)
				cts, err := b.Encrypt(ctx, tenant, []transit.Item{{Plaintext: data, AssociatedData: []byte("aad")}})
				if err != nil {
					return nil, err
				}
				pts, err := v.Decrypt(ctx, tenant, []transit.Item{{Ciphertext: cts[0], AssociatedData: []byte("aad")}})
				if err != nil {
					return nil, err
				}
				return pts[0], nil
			}
			want := func(i int) []byte {
				data := []byte(fmt.Sprintf("fingerprint input %d", i))
				if op == "hmac" {
					mac, err := v.HMAC(ctx, data)
					if err != nil {
						t.Fatal(err)
					}
					return mac
				}
				return data
			}
			before := len(g.callLog())
			release := g.holdCalls()
			defer release()
			const n = 6
			got := make([]chan []byte, n)
			for i := range n {
				got[i] = make(chan []byte, 1)
				go func() {
					out, err := call(i)
					if err != nil {
						t.Errorf("call %d: %v", i, err)
					}
					got[i] <- out
				}()
				if i == 0 {
					waitEntered(t, g, op)
				}
			}
			waitQueued(t, b, op, n-1)
			release()
			for i := range n {
				if out := <-got[i]; !bytes.Equal(out, want(i)) {
					t.Errorf("call %d: got %x, want %x", i, out, want(i))
				}
			}
			var sizes []int
			for _, c := range g.callLog()[before:] {
				if c.op == op {
					sizes = append(sizes, c.items)
				}
			}
			if !slices.Equal(sizes, []int{1, n - 1}) {
				t.Errorf("%s backend calls carried %v items, want [1 %d]", op, sizes, n-1)
			}
		})
	}
}

// A caller whose context ends stops waiting at once. Queued, its items are
// never sent; in flight, the call goes on for the others, and is cancelled
// once every caller in it has left.
func TestBatchingCallerContextBoundsItsWait(t *testing.T) {
	k := newKeyring(t)
	g := newGated(k)
	b := transit.NewBatching(g, transit.BatchOptions{MaxInFlight: 1})
	ctx := t.Context()
	ct, err := k.Encrypt(ctx, "tenant-a", []transit.Item{{Plaintext: []byte("secret"), AssociatedData: []byte("aad")}})
	if err != nil {
		t.Fatal(err)
	}
	item := []transit.Item{{Ciphertext: ct[0], AssociatedData: []byte("aad")}}

	release := g.holdCalls()
	defer release()
	// A: in flight, the only caller of its call, gives up.
	ctxA, cancelA := context.WithCancel(ctx)
	errA := make(chan error, 1)
	go func() { _, err := b.Decrypt(ctxA, "tenant-a", item); errA <- err }()
	waitEntered(t, g, "decrypt")
	// B: queued behind A, gives up before it is sent.
	ctxB, cancelB := context.WithCancel(ctx)
	errB := make(chan error, 1)
	go func() { _, err := b.Decrypt(ctxB, "tenant-a", item); errB <- err }()
	// C: queued behind A, waits.
	outC := make(chan outcome, 1)
	go func() {
		pts, err := b.Decrypt(ctx, "tenant-a", append(slices.Clone(item), item...))
		outC <- outcome{pts, err}
	}()
	waitQueued(t, b, "decrypt", 3)

	cancelB()
	if err := <-errB; !errors.Is(err, context.Canceled) || !errors.Is(err, transit.ErrUnavailable) {
		t.Errorf("queued caller that gave up: %v, want ErrUnavailable and context.Canceled", err)
	}
	waitQueued(t, b, "decrypt", 2) // B's item left the queue
	cancelA()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Errorf("in-flight caller that gave up: %v, want context.Canceled", err)
	}
	calls := g.callLog()
	select {
	case <-calls[0].ctxDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the backend call of a batch whose callers all left was not cancelled")
	}
	release()
	got := <-outC
	if got.err != nil || len(got.plaintexts) != 2 || string(got.plaintexts[0]) != "secret" || string(got.plaintexts[1]) != "secret" {
		t.Fatalf("remaining caller: %q, %v", got.plaintexts, got.err)
	}
	var sizes []int
	for _, c := range g.callLog() {
		sizes = append(sizes, c.items)
	}
	if !slices.Equal(sizes, []int{1, 2}) {
		t.Errorf("backend calls carried %v items, want [1 2]: the abandoned queued item must not be sent", sizes)
	}

	// A context that has already ended never reaches the backend.
	done, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := b.Decrypt(done, "tenant-a", item); !errors.Is(err, context.Canceled) {
		t.Errorf("Decrypt with an ended context: %v, want context.Canceled", err)
	}
	if n := len(g.callLog()); n != 2 {
		t.Errorf("%d backend calls, want still 2", n)
	}
}

// A batch call that fails as a whole fails every caller in it, with the
// backend's error.
func TestBatchingBackendFailureReachesEveryCaller(t *testing.T) {
	g := newGated(newKeyring(t))
	b := transit.NewBatching(g, transit.BatchOptions{MaxInFlight: 1})
	ctx := t.Context()
	release := g.holdCalls()
	defer release()
	g.mu.Lock()
	g.fail = fmt.Errorf("backend down: %w", transit.ErrUnavailable)
	g.mu.Unlock()
	errs := make(chan error, 4)
	for i := range 4 {
		go func() {
			_, err := b.Encrypt(ctx, "tenant-a", []transit.Item{{Plaintext: []byte("secret")}})
			errs <- err
		}()
		if i == 0 {
			waitEntered(t, g, "encrypt")
		}
	}
	waitQueued(t, b, "encrypt", 3)
	release()
	for range 4 {
		if err := <-errs; !errors.Is(err, transit.ErrUnavailable) {
			t.Errorf("caller got %v, want ErrUnavailable", err)
		}
	}
}

// Under a storm of concurrent calls of every size no item is lost,
// duplicated or handed to the wrong caller, no batch exceeds MaxItems, and a
// call of MaxItems items or more goes by itself.
func TestBatchingLosesNoItem(t *testing.T) {
	tests := []struct {
		name string
		opts transit.BatchOptions
	}{
		{"at once", transit.BatchOptions{MaxItems: 5, MaxInFlight: 2}},
		{"lingering", transit.BatchOptions{MaxItems: 5, MaxInFlight: 2, MaxWait: 200 * time.Microsecond}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := newKeyring(t)
			var mu sync.Mutex
			sent := map[string]int{}
			oversize := 0 // backend calls of more than MaxItems items
			tc.opts.OnBatch = func(op string, n int) {
				mu.Lock()
				defer mu.Unlock()
				sent[op] += n
				if n > tc.opts.MaxItems {
					oversize++
				}
			}
			b := transit.NewBatching(k, tc.opts)
			ctx := t.Context()
			const callers, rounds = 40, 10
			var wg sync.WaitGroup
			var encItems, decItems, macItems, bigCalls int64
			var countMu sync.Mutex
			for c := range callers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for r := range rounds {
						n := 1 + (c+r)%7 // 1..7: some calls exceed MaxItems
						tenant := fmt.Sprintf("tenant-%d", c%4)
						items := make([]transit.Item, n)
						for i := range items {
							items[i] = transit.Item{Plaintext: []byte(fmt.Sprintf("c%d r%d i%d", c, r, i)), AssociatedData: []byte(fmt.Sprintf("aad %d", i))}
						}
						cts, err := b.Encrypt(ctx, tenant, items)
						if err != nil {
							t.Errorf("Encrypt: %v", err)
							return
						}
						dec := make([]transit.Item, n)
						for i := range dec {
							dec[i] = transit.Item{Ciphertext: cts[i], AssociatedData: items[i].AssociatedData}
						}
						pts, err := b.Decrypt(ctx, tenant, dec)
						if err != nil {
							t.Errorf("Decrypt: %v", err)
							return
						}
						for i := range items {
							if !bytes.Equal(pts[i], items[i].Plaintext) {
								t.Errorf("caller %d round %d item %d: got %q, want %q", c, r, i, pts[i], items[i].Plaintext)
							}
						}
						mac, err := b.HMAC(ctx, items[0].Plaintext)
						if err != nil {
							t.Errorf("HMAC: %v", err)
							return
						}
						if want, _ := k.HMAC(ctx, items[0].Plaintext); !bytes.Equal(mac, want) {
							t.Errorf("caller %d round %d: HMAC differs from the backend's", c, r)
						}
						countMu.Lock()
						encItems += int64(n)
						decItems += int64(n)
						macItems++
						if n > tc.opts.MaxItems {
							bigCalls += 2 // its Encrypt and its Decrypt
						}
						countMu.Unlock()
					}
				}()
			}
			wg.Wait()
			mu.Lock()
			defer mu.Unlock()
			if int64(sent["encrypt"]) != encItems || int64(sent["decrypt"]) != decItems || int64(sent["hmac"]) != macItems {
				t.Errorf("items sent %v, submitted encrypt %d, decrypt %d, hmac %d", sent, encItems, decItems, macItems)
			}
			// Only the calls of more than MaxItems items, each by itself, may
			// exceed MaxItems.
			if int64(oversize) != bigCalls {
				t.Errorf("%d backend calls of more than %d items, want %d (one per call that big, no batch)", oversize, tc.opts.MaxItems, bigCalls)
			}
		})
	}
}

// A lingering batch goes as soon as it is full, without waiting out MaxWait.
func TestBatchingFullBatchDoesNotLinger(t *testing.T) {
	k := newKeyring(t)
	sizes := make(chan int, 10)
	b := transit.NewBatching(k, transit.BatchOptions{MaxItems: 3, MaxInFlight: 1, MaxWait: time.Hour,
		OnBatch: func(_ string, n int) { sizes <- n }})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := b.Encrypt(ctx, "tenant-a", []transit.Item{{Plaintext: []byte{byte(i)}}}); err != nil {
				t.Errorf("Encrypt: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := <-sizes; n != 3 {
		t.Errorf("first batch of %d items, want 3 (one full batch)", n)
	}
}

// A caller that gives up may wipe its buffers at once: the batcher sends
// its own copies (the race detector checks this).
func TestBatchingCopiesCallerBuffers(t *testing.T) {
	g := newGated(newKeyring(t))
	b := transit.NewBatching(g, transit.BatchOptions{MaxInFlight: 1})
	release := g.holdCalls()
	defer release()
	go func() { _, _ = b.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte("first")}}) }()
	waitEntered(t, g, "encrypt")
	plain, aad := []byte("secret that the caller wipes"), []byte("aad")
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := b.Encrypt(ctx, "tenant-a", []transit.Item{{Plaintext: plain, AssociatedData: aad}})
		errc <- err
	}()
	waitQueued(t, b, "encrypt", 1)
	other := make(chan error, 1)
	go func() {
		_, err := b.Encrypt(t.Context(), "tenant-b", []transit.Item{{Plaintext: []byte("neighbour")}})
		other <- err
	}()
	waitQueued(t, b, "encrypt", 2)
	release()
	cancel()
	<-errc
	clear(plain)
	clear(aad)
	if err := <-other; err != nil {
		t.Fatalf("neighbour: %v", err)
	}
}

// The Batcher side of Batching (EncryptEach, DecryptEach, HMACEach: the
// credentials service's BatchPutCredentials) answers item by item, mixes
// tenants, agrees with its backend, and sends a call of at least MaxItems
// items by itself.
func TestBatchingEachAnswersItemByItem(t *testing.T) {
	k := newKeyring(t)
	g := newGated(k)
	b := transit.NewBatching(g, transit.BatchOptions{MaxItems: 4})
	ctx := t.Context()
	items := []transit.TenantItem{
		{Tenant: "tenant-a", Item: transit.Item{Plaintext: []byte("one"), AssociatedData: []byte("a/1")}},
		{Tenant: "tenant-b", Item: transit.Item{Plaintext: []byte("two"), AssociatedData: []byte("b/2")}},
	}
	enc, err := b.EncryptEach(ctx, items)
	if err != nil || len(enc) != 2 || enc[0].Err != nil || enc[1].Err != nil {
		t.Fatalf("EncryptEach = %+v, %v", enc, err)
	}
	opened := []transit.TenantItem{
		{Tenant: "tenant-a", Item: transit.Item{Ciphertext: enc[0].Ciphertext, AssociatedData: []byte("a/1")}},
		{Tenant: "tenant-a", Item: transit.Item{Ciphertext: enc[1].Ciphertext, AssociatedData: []byte("b/2")}}, // wrong tenant
	}
	dec, err := b.DecryptEach(ctx, opened)
	if err != nil || string(dec[0].Plaintext) != "one" || !errors.Is(dec[1].Err, transit.ErrDecrypt) || dec[1].Plaintext != nil {
		t.Errorf("DecryptEach = %+v, %v; want the first item opened, the second ErrDecrypt alone", dec, err)
	}
	if _, err := b.EncryptEach(ctx, []transit.TenantItem{{Item: transit.Item{Plaintext: []byte("x")}}}); !errors.Is(err, transit.ErrInvalid) {
		t.Errorf("EncryptEach with an empty tenant = %v, want ErrInvalid", err)
	}
	inputs := [][]byte{[]byte("m1"), []byte("m2"), []byte("m3"), []byte("m4"), []byte("m5")}
	macs, err := b.HMACEach(ctx, inputs)
	if err != nil {
		t.Fatal(err)
	}
	want, err := k.HMACEach(ctx, inputs)
	if err != nil {
		t.Fatal(err)
	}
	for i := range inputs {
		if macs[i].Err != nil || !bytes.Equal(macs[i].MAC, want[i].MAC) {
			t.Errorf("HMACEach item %d = %+v, want the backend's MAC", i, macs[i])
		}
	}
	var ops []string
	for _, c := range g.callLog() {
		ops = append(ops, fmt.Sprintf("%s/%d", c.op, c.items))
	}
	if want := []string{"encrypt/2", "decrypt/2", "hmac/5"}; !slices.Equal(ops, want) {
		t.Errorf("backend calls %v, want %v (one each; the 5 MACs, above MaxItems, in one call of their own)", ops, want)
	}
}
