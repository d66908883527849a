package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestSmoke runs a tiny bench end to end on a real redis-server and a real
// Vault dev server, the production variants included (the memory phase,
// which builds and runs the real binary, is left to the bench itself).
func TestSmoke(t *testing.T) {
	opts := DefaultOptions()
	opts.Phases = []string{PhaseOverhead, PhaseAmplification, PhaseControl, PhaseStreams}
	opts.Streams = 20 * streamsPerHandle * handlesPerAcct / 10 // two accounts
	opts.Warmup, opts.Duration, opts.Rounds = 10*time.Millisecond, 60*time.Millisecond, 1
	opts.Concurrency = []int{2}
	opts.ControlConcurrency = []int{2}
	opts.AmpCallers, opts.AmpInstances = []int{5}, []int{2}
	opts.AmpDuration, opts.AmpInterval = 300*time.Millisecond, 100*time.Millisecond
	opts.AuditDir = t.TempDir()
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
		summaries := map[string]Summary{varDirect: row.Direct, varBare: row.Bare, varGateway: row.Gateway, varDistinct: row.GatewayDistinct}
		var levels []string
		for _, l := range row.Levels {
			summaries[l.Variant] = l.Summary
			levels = append(levels, l.Level)
		}
		if !slices.Equal(levels, securityLevels) {
			t.Errorf("%s: production levels %v, want %v", row.Provider, levels, securityLevels)
		}
		for name, s := range summaries {
			if calls(s) == 0 || s.Errors > 0 {
				t.Errorf("%s %s: %d calls, %d errors (%s)", row.Provider, name, calls(s), s.Errors, s.FirstError)
			}
			if name != varGateway && s.UpstreamPerOp < 0.99 && name != varDirect && name != varBare {
				t.Errorf("%s %s: %.2f upstream requests per call, want 1 (no sharing across credentials)", row.Provider, name, s.UpstreamPerOp)
			}
		}
	}
	logins := map[string]int{}
	for _, r := range rep.Amplification.Rows {
		want := int64(1)
		if r.Client == "naive" {
			want = int64(r.Callers)
		}
		logins[r.Client+"/"+r.Level]++
		if r.Logins != want || r.Errors > 0 {
			t.Errorf("%s %s %s: %d logins, %d errors (%s); want %d logins", r.Provider, r.Client, r.Level, r.Logins, r.Errors, r.FirstErr, want)
		}
	}
	if logins["gateway/"+lvlProduction] != len(providers) {
		t.Errorf("amplification rows %v: want one production gateway row per provider", logins)
	}
	seen := map[string]bool{}
	for _, r := range rep.Control.Rows {
		seen[r.Op+"/"+r.Variant] = true
		if calls(r.Summary) == 0 || r.Summary.Errors > 0 {
			t.Errorf("control %s %s: %d calls, %d errors (%s)", r.Op, r.Variant, calls(r.Summary), r.Summary.Errors, r.Summary.FirstError)
		}
		if r.Op == opPut && r.Variant == credPlainBatch && (r.TransitCallsPerCall <= 0 || r.TransitCallsPerCall > 2) {
			t.Errorf("PutCredential plain+batch: %.2f transit calls per call, want (0, 2]", r.TransitCallsPerCall)
		}
	}
	for _, v := range credsVariants {
		if !seen[opPut+"/"+v.name] {
			t.Errorf("control: no PutCredential row for variant %s", v.name)
		}
	}
	for _, v := range []string{lvlPlain, lvlTLS, lvlPolicy, lvlLimits, lvlProduction} {
		if !seen[opIssue+"/"+v] || !seen[opResolve+"/"+v] || !seen[opNoop+"/"+v] {
			t.Errorf("control: no IssueSession/ResolveSession/no-op rows for variant %s", v)
		}
	}
	for _, v := range []string{lvlPlain, lvlProduction} {
		if !seen[opBatchPut+"/"+v] {
			t.Errorf("control: no BatchPutCredentials row for variant %s", v)
		}
	}
	for _, r := range rep.Control.Rows {
		if (r.Op == opIssue || r.Op == opResolve) && r.ThroughputVsNoop <= 0 {
			t.Errorf("control %s %s: no ratio to the no-op call", r.Op, r.Variant)
		}
		// A 60 ms window can end before a batch call completes (rate 0), so
		// the ratio is only required where the call's rate was measured.
		if r.Op == opBatchPut && ((r.ItemsVsEncryptBatch <= 0 && r.Summary.Throughput > 0) || r.ItemsPerCall != batchPutItems) {
			t.Errorf("control %s %s: %d items per call, %.2f of transit's batch encrypt; want %d and a ratio", r.Op, r.Variant, r.ItemsPerCall, r.ItemsVsEncryptBatch, batchPutItems)
		}
		if r.Variant == lvlProduction && (r.Op == opIssue || r.Op == opPut) && r.AuditSyncsPerCall <= 0 {
			t.Errorf("control %s %s: no audit group commit figures", r.Op, r.Variant)
		}
	}
	// Every stream opened and got its first message, and an account's
	// streams share one upstream poll per interval.
	if st := rep.Streams; st == nil || st.Errors > 0 || st.Messages < int64(opts.Streams) || st.Accounts != 2 ||
		st.PollsPerAccountPerInterval <= 0 || st.PollsPerAccountPerInterval > 1.5 || st.With.Goroutines <= st.Before.Goroutines {
		t.Errorf("streams phase: %+v; want every stream's first message, no errors, 2 accounts, about 1 poll per account per interval", st)
	}
	// The production services kept an audit trail on disk: intent and
	// outcome records of every call they served.
	if rep.Audit == nil || rep.Audit.Files == 0 || rep.Audit.Records == 0 {
		t.Errorf("audit trail of the production variants: %+v, want records in files", rep.Audit)
	}
	var text bytes.Buffer
	if err := WriteText(&text, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Targets", "1b. Production wiring", "production-nobatch", "6. Streams"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report has no %q:\n%s", want, text.String())
		}
	}
	if _, err := json.Marshal(rep); err != nil {
		t.Fatal(err)
	}
}

// calls is how many calls a measurement completed, warm-up included: at
// least one per caller. (A rate over a 60 ms window can be 0 on a loaded
// machine; that says nothing about the bench.)
func calls(s Summary) int64 {
	var n int64
	for _, r := range s.Rounds {
		n += r.TotalOps
	}
	return n
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
