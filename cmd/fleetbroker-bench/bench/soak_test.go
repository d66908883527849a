package bench

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// TestSoakSmoke runs the soak phase for a few seconds end to end: the real
// services built from this tree on a real redis-server and Vault dev
// server, the peak probe, the open-loop soak and the sampling of each
// process.
func TestSoakSmoke(t *testing.T) {
	opts := DefaultOptions()
	opts.Phases = []string{PhaseSoak}
	opts.Soak = SoakOptions{Duration: 4 * time.Second, Interval: 500 * time.Millisecond, Share: 0.7,
		ProbeDuration: time.Second, ProbeCallers: []int{4}, Accounts: 4}
	opts.Progress = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	rep, err := Run(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	s := rep.Soak
	if s == nil {
		t.Fatal("no soak report")
	}
	if s.PeakRPS <= 0 || s.TargetRPS <= 0 || s.Result.Ops == 0 || s.Result.Errors > 0 {
		t.Fatalf("soak: peak %.0f/s, target %.0f/s, %d calls, %d errors (%s)", s.PeakRPS, s.TargetRPS, s.Result.Ops, s.Result.Errors, s.Result.FirstError)
	}
	for _, o := range soakOps {
		if s.Calls[o.name] == 0 {
			t.Errorf("the soak made no %s call (calls: %v)", o.name, s.Calls)
		}
	}
	seen := map[string]int{}
	for _, sample := range s.Samples {
		if sample.RSSMiB <= 0 || sample.Goroutines <= 0 || sample.FDs <= 0 {
			t.Errorf("a sample without a reading: %+v", sample)
		}
		seen[sample.Process]++
	}
	if seen["credentials"] < 2*soakWindow || seen["gateway"] < 2*soakWindow {
		t.Errorf("samples per process %v, want at least %d of credentials and gateway", seen, 2*soakWindow)
	}
	if len(s.Growth) != 2*len(soakFlat) {
		t.Errorf("growth figures %+v, want one per process and measure", s.Growth)
	}
	var text bytes.Buffer
	if err := WriteText(&text, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "6. Soak") || !strings.Contains(text.String(), "soak gateway rss_mib flat") {
		t.Errorf("text report lacks the soak:\n%s", text.String())
	}
}
