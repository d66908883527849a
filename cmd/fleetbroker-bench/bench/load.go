package bench

import (
	"context"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Op is one request of a load run; worker is the caller's index in
// [0, Workers).
type Op func(ctx context.Context, worker int) error

// Load describes one measurement.
//
// Closed loop (Rate 0): Workers callers each issue requests back to back;
// a request's latency is measured from when it was sent.
//
// Open loop (Rate > 0): requests are scheduled at Rate per second in
// total, evenly spaced, and Workers callers take the next slot; latency is
// measured from the slot's scheduled time, not from when a caller got to
// send it, so time spent queued behind a slow reply counts (no coordinated
// omission, as in wrk2 or HdrHistogram's corrected recording). If every
// worker is busy the schedule slips and the latencies show it.
//
// Requests scheduled during Warmup run but are not recorded. Every run is
// bounded in time (Warmup + Duration, then in-flight requests finish) and in
// count (MaxOps).
type Load struct {
	Workers  int
	Warmup   time.Duration
	Duration time.Duration
	Rate     float64
	MaxOps   int64
}

// Result is one measurement. Latencies are over successful requests
// scheduled after the warm-up; percentiles are exact (sorted samples).
type Result struct {
	Workers    int     `json:"workers"`
	Mode       string  `json:"mode"`
	Ops        int64   `json:"ops"`
	Errors     int64   `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	TotalOps   int64   `json:"total_ops"` // warm-up included
	ElapsedS   float64 `json:"elapsed_s"`
	Throughput float64 `json:"throughput_rps"`
	P50ms      float64 `json:"p50_ms"`
	P90ms      float64 `json:"p90_ms"`
	P99ms      float64 `json:"p99_ms"`
	MaxMs      float64 `json:"max_ms"`
}

// defaultMaxOps bounds a run whose Load names no bound.
const defaultMaxOps = 5_000_000

// opTimeout bounds each request, so a stuck request cannot hold a run.
const opTimeout = 10 * time.Second

// RunLoad executes l with op and returns the measurement.
func RunLoad(ctx context.Context, l Load, op Op) Result {
	workers := max(l.Workers, 1)
	maxOps := l.MaxOps
	if maxOps <= 0 {
		maxOps = defaultMaxOps
	}
	var interval time.Duration
	mode := "closed"
	if l.Rate > 0 {
		mode = "open"
		interval = time.Duration(float64(time.Second) / l.Rate)
	}
	start := time.Now()
	measureFrom := start.Add(l.Warmup)
	stopAt := measureFrom.Add(l.Duration)

	var (
		seq      atomic.Int64 // open loop: next schedule slot; both: ops started
		mu       sync.Mutex
		samples  []time.Duration
		errs     int64
		firstErr string
		total    int64
		lastDone time.Time
		wg       sync.WaitGroup
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 1024)
			var localErrs, localTotal int64
			var localFirst string
			var done time.Time
			for ctx.Err() == nil {
				n := seq.Add(1) - 1
				if n >= maxOps {
					break
				}
				var sent time.Time
				if interval > 0 {
					sent = start.Add(time.Duration(n) * interval)
					if !sent.Before(stopAt) {
						break
					}
					if d := time.Until(sent); d > 0 && !sleepCtx(ctx, d) {
						break
					}
				} else {
					sent = time.Now()
					if !sent.Before(stopAt) {
						break
					}
				}
				octx, cancel := context.WithTimeout(ctx, opTimeout)
				err := op(octx, w)
				cancel()
				done = time.Now()
				localTotal++
				if sent.Before(measureFrom) {
					continue
				}
				if err != nil {
					localErrs++
					if localFirst == "" {
						localFirst = err.Error()
					}
					continue
				}
				local = append(local, done.Sub(sent))
			}
			mu.Lock()
			samples = append(samples, local...)
			errs += localErrs
			total += localTotal
			if firstErr == "" {
				firstErr = localFirst
			}
			if done.After(lastDone) {
				lastDone = done
			}
			mu.Unlock()
		}()
	}
	wg.Wait()

	// Closed loop: requests started in the window over its length (steady
	// state, so the last replies running past the window do not count
	// twice). Open loop: every slot of the window is sent however late, so
	// the rate is over the time until the last reply.
	elapsed := l.Duration
	if interval > 0 {
		elapsed = stopAt.Sub(measureFrom)
		if lastDone.After(stopAt) {
			elapsed = lastDone.Sub(measureFrom)
		}
	}
	r := Result{Workers: workers, Mode: mode, Ops: int64(len(samples)) + errs, Errors: errs, FirstError: firstErr,
		TotalOps: total, ElapsedS: elapsed.Seconds()}
	if elapsed > 0 {
		r.Throughput = float64(len(samples)) / elapsed.Seconds()
	}
	slices.Sort(samples)
	r.P50ms = ms(percentile(samples, 0.50))
	r.P90ms = ms(percentile(samples, 0.90))
	r.P99ms = ms(percentile(samples, 0.99))
	if len(samples) > 0 {
		r.MaxMs = ms(samples[len(samples)-1])
	}
	return r
}

// percentile is the nearest-rank percentile of sorted samples.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// parallel runs f(i) for i in [0, n) on conc goroutines and returns the
// first error.
func parallel(parent context.Context, n, conc int, f func(ctx context.Context, i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	for range max(min(conc, n), 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(ctx, i); err != nil {
					once.Do(func() { first = err; cancel() })
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil {
		first = parent.Err()
	}
	return first
}
