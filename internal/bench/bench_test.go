package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestSmoke runs a tiny bench end to end on a real redis-server (the dev
// keyring stands in for Vault; the memory phase, which builds and runs the
// real binary against Vault, is left to the bench itself).
func TestSmoke(t *testing.T) {
	opts := DefaultOptions()
	opts.Phases = []string{PhaseOverhead, PhaseAmplification, PhaseControl}
	opts.NoVault = true
	opts.Warmup, opts.Duration, opts.Rounds = 10*time.Millisecond, 60*time.Millisecond, 1
	opts.Concurrency = []int{2}
	opts.ControlConcurrency = []int{2}
	opts.AmpCallers, opts.AmpInstances = []int{5}, []int{2}
	opts.AmpDuration, opts.AmpInterval = 300*time.Millisecond, 100*time.Millisecond
	opts.Progress = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	rep, err := Run(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Overhead) != len(providers) {
		t.Fatalf("overhead rows = %d, want one per provider", len(rep.Overhead))
	}
	for _, row := range rep.Overhead {
		for name, s := range map[string]Summary{varDirect: row.Direct, varBare: row.Bare, varGateway: row.Gateway, varDistinct: row.GatewayDistinct} {
			if s.Throughput <= 0 || s.Errors > 0 {
				t.Errorf("%s %s: %.0f req/s, %d errors (%s)", row.Provider, name, s.Throughput, s.Errors, s.FirstError)
			}
		}
		if row.GatewayDistinct.UpstreamPerOp < 0.99 {
			t.Errorf("%s gateway-distinct: %.2f upstream requests per call, want 1 (no sharing across credentials)", row.Provider, row.GatewayDistinct.UpstreamPerOp)
		}
	}
	for _, r := range rep.Amplification.Rows {
		want := int64(1)
		if r.Client == "naive" {
			want = int64(r.Callers)
		}
		if r.Logins != want || r.Errors > 0 {
			t.Errorf("%s %s: %d logins, %d errors (%s); want %d logins", r.Provider, r.Client, r.Logins, r.Errors, r.FirstErr, want)
		}
	}
	for _, r := range rep.Control.Rows {
		if r.Result.Throughput <= 0 || r.Result.Errors > 0 {
			t.Errorf("control %s: %.0f calls/s, %d errors (%s)", r.Op, r.Result.Throughput, r.Result.Errors, r.Result.FirstError)
		}
	}
	var text bytes.Buffer
	if err := WriteText(&text, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "Targets") {
		t.Errorf("text report has no targets:\n%s", text.String())
	}
	if _, err := json.Marshal(rep); err != nil {
		t.Fatal(err)
	}
}

// TestRunLoadOpenLoopCountsQueueing checks the open loop measures latency
// from the scheduled send time: with one worker and requests that take
// twice the schedule interval, latency must grow well past the service time.
func TestRunLoadOpenLoopCountsQueueing(t *testing.T) {
	var calls atomic.Int64
	r := RunLoad(context.Background(), Load{Workers: 1, Duration: 200 * time.Millisecond, Rate: 100}, func(ctx context.Context, _ int) error {
		calls.Add(1)
		time.Sleep(20 * time.Millisecond) // service time 20 ms, interval 10 ms
		return nil
	})
	if r.Mode != "open" || r.Ops != 20 {
		t.Fatalf("mode %s, %d ops; want open, 20 (every scheduled slot sent)", r.Mode, r.Ops)
	}
	if r.MaxMs < 150 {
		t.Errorf("max latency %.1f ms; the 20th request was scheduled at 190 ms and sent at ~380 ms, so it must be ≥ 150 ms", r.MaxMs)
	}
	closed := RunLoad(context.Background(), Load{Workers: 2, Warmup: 20 * time.Millisecond, Duration: 100 * time.Millisecond}, func(ctx context.Context, w int) error {
		if w == 1 {
			return errors.New("worker 1 fails")
		}
		time.Sleep(time.Millisecond)
		return nil
	})
	if closed.Mode != "closed" || closed.Errors == 0 || closed.FirstError != "worker 1 fails" || closed.P50ms < 1 {
		t.Errorf("closed loop result %+v: want errors counted apart and p50 ≥ 1 ms", closed)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}
