// Package bench is fleetbroker's benchmark: it starts a real redis-server
// and a real Vault dev server, simulators with a configurable reply
// latency, and the services on loopback TCP, then measures the gateway's
// overhead against a direct HTTP call and a bare gRPC forwarder, upstream
// login amplification, the control plane, the gateway's memory and its
// scaling curve. cmd/fleetbroker-bench is its command line; docs/benchmarks.md
// has the figures.
//
// The load generator (load.go) is closed loop by default (a fixed number of
// callers issuing requests back to back); with a rate it is open loop and
// measures latency from each request's scheduled send time.
package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Phases, in the order they run.
const (
	PhaseOverhead      = "overhead"
	PhaseScaling       = "scaling"
	PhaseAmplification = "amplification"
	PhaseControl       = "control"
	PhaseMemory        = "memory"
	PhaseStreams       = "streams"
)

// AllPhases is every phase.
var AllPhases = []string{PhaseOverhead, PhaseScaling, PhaseAmplification, PhaseControl, PhaseMemory, PhaseStreams}

// Options configure a run. DefaultOptions is the documented run.
type Options struct {
	Phases      []string
	Warmup      time.Duration
	Duration    time.Duration
	Rounds      int
	Concurrency []int
	// Variants limits the overhead phase to some of direct, bare, gateway,
	// gateway-distinct (empty: all), e.g. to profile one of them.
	Variants []string
	// Rate > 0 makes every measurement open loop at this many requests per
	// second (Concurrency then bounds the requests in flight).
	Rate float64
	// SimLatency is added by the simulators to every reply.
	SimLatency time.Duration

	ScalingMax    int
	ScalingRounds int

	ControlConcurrency []int
	// ControlOps limits the control phase to some operations (empty: all),
	// e.g. to profile one; Variants, if set, limits its variants too.
	ControlOps []string

	AmpLifetime  time.Duration
	AmpDuration  time.Duration
	AmpInterval  time.Duration
	AmpCallers   []int
	AmpInstances []int

	MemHandles     int
	MemAccounts    int
	MemHold        time.Duration
	FleetbrokerBin string
	// Streams is how many WatchPositions streams the streams phase opens
	// on one gateway.
	Streams int

	// Soak configures the soak phase (soak.go), run only when named.
	Soak SoakOptions

	// NoVault uses the dev keyring instead of Vault (no Vault figures, no
	// memory phase).
	NoVault bool
	// QuietServices drops the services' logs instead of encoding them. By
	// default they are encoded as JSON at info level (production's default)
	// into io.Discard, so the gateway pays for its per-call log line.
	QuietServices bool
	// BaselineIdlePerHost sizes the keep-alive pool of the direct caller
	// and the bare forwarder (Go's default is 2).
	BaselineIdlePerHost int
	// GatewayIdlePerHost > 0 builds the hot-path gateway with this many
	// idle upstream connections per host instead of the production
	// transport's Go default of 2 (a proposed fix, measured before/after).
	GatewayIdlePerHost int

	// NoProduction skips the production variants (production.go): the
	// services at each security level up to what `fleetbroker credentials`
	// and `fleetbroker gateway` run.
	NoProduction bool
	// AuditDir is where the production variants' audit files go (default
	// the system's temporary directory): it must be on the disk whose
	// fsync is to be measured, not a tmpfs.
	AuditDir string
	// TransitBatch shapes the transit batching of the credentials variants
	// that batch (plain+batch, production), as the credentials service's
	// --transit-batch-* flags do.
	TransitBatch transit.BatchOptions

	// Progress receives one line per measurement (nil: none).
	Progress io.Writer
}

// DefaultOptions is the run docs/benchmarks.md reports: about 5 minutes
// on 2 cores.
func DefaultOptions() Options {
	return Options{
		Phases:              AllPhases,
		Warmup:              300 * time.Millisecond,
		Duration:            time.Second,
		Rounds:              3,
		Concurrency:         []int{1, 16, 256},
		ScalingMax:          512,
		ScalingRounds:       1,
		ControlConcurrency:  []int{1, 16},
		AmpLifetime:         10 * time.Second,
		AmpDuration:         12 * time.Second,
		AmpInterval:         time.Second,
		AmpCallers:          []int{1, 100, 1000},
		AmpInstances:        []int{1, 3},
		MemHandles:          10_000,
		MemAccounts:         1_000,
		MemHold:             6 * time.Second,
		Streams:             20_000,
		BaselineIdlePerHost: 1024,
		TransitBatch:        transit.BatchOptions{MaxItems: transit.DefaultBatchMaxItems, MaxInFlight: transit.DefaultBatchMaxInFlight},
		Soak:                DefaultSoakOptions(),
	}
}

func (o Options) load(workers int) Load {
	return Load{Workers: workers, Warmup: o.Warmup, Duration: o.Duration, Rate: o.Rate}
}

func (o Options) progress(msg string) {
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "%s  %s\n", time.Now().Format("15:04:05"), msg)
	}
}

func (o Options) serviceLogger() *slog.Logger {
	if o.QuietServices {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func (o Options) hasVariant(v string) bool {
	return len(o.Variants) == 0 || slices.Contains(o.Variants, v)
}

func (o Options) has(phase string) bool {
	for _, p := range o.Phases {
		if p == phase {
			return true
		}
	}
	return false
}

// Report is everything a run measured.
type Report struct {
	Date     string         `json:"date"`
	Machine  Machine        `json:"machine"`
	Settings map[string]any `json:"settings"`

	Overhead      []OverheadRow  `json:"overhead,omitempty"`
	Scaling       []ScalingPoint `json:"scaling,omitempty"`
	Knees         map[string]int `json:"scaling_knee_callers,omitempty"`
	Amplification *AmpReport     `json:"amplification,omitempty"`
	Control       *ControlReport `json:"control_plane,omitempty"`
	Memory        *MemoryReport  `json:"memory,omitempty"`
	// MemoryProduction is the same gateway at the production level.
	MemoryProduction *MemoryReport `json:"memory_production,omitempty"`
	MemoryError      string        `json:"memory_error,omitempty"`
	// Streams is what open WatchPositions streams cost one gateway.
	Streams *StreamsReport `json:"streams,omitempty"`
	// Audit is what the production variants' audit trails hold at the end.
	Audit   *AuditStats `json:"audit,omitempty"`
	Soak    *SoakReport `json:"soak,omitempty"`
	Targets []Target    `json:"targets"`
}

// Machine describes where the run happened.
type Machine struct {
	CPU        string `json:"cpu"`
	CPUs       int    `json:"cpus"`
	MemTotal   string `json:"mem_total"`
	Kernel     string `json:"kernel"`
	GoVersion  string `json:"go_version"`
	GOMAXPROCS int    `json:"gomaxprocs"`
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0)}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && k == "MemTotal" {
				m.MemTotal = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// Run runs the selected phases and returns what they measured. A phase
// that fails ends the run with an error, except the memory phase, whose
// error is recorded in the report.
func Run(ctx context.Context, opts Options) (*Report, error) {
	rep := &Report{Date: time.Now().UTC().Format("2006-01-02"), Machine: machine(), Settings: map[string]any{
		"phases": opts.Phases, "warmup": opts.Warmup.String(), "duration": opts.Duration.String(), "rounds": opts.Rounds,
		"concurrency": opts.Concurrency, "open_loop_rate": opts.Rate, "sim_latency": opts.SimLatency.String(),
		"scaling_max": opts.ScalingMax, "amp_lifetime": opts.AmpLifetime.String(), "amp_duration": opts.AmpDuration.String(),
		"amp_interval": opts.AmpInterval.String(), "amp_callers": opts.AmpCallers, "amp_instances": opts.AmpInstances,
		"mem_handles": opts.MemHandles, "mem_accounts": opts.MemAccounts, "streams": opts.Streams, "vault": !opts.NoVault,
		"service_logs":        map[bool]string{true: "discarded", false: "JSON at info, encoded into io.Discard"}[opts.QuietServices],
		"fleetup_rate_budget": unlimitedFleetUp, "gateway_idle_per_host": opts.GatewayIdlePerHost,
		"baseline_idle_per_host": opts.BaselineIdlePerHost, "production_variants": !opts.NoProduction,
		"audit_dir": opts.AuditDir, "production_rate_budgets": benchRateLimit,
		"transit_batch": map[string]any{"size": opts.TransitBatch.MaxItems, "calls": opts.TransitBatch.MaxInFlight, "wait": opts.TransitBatch.MaxWait.String()},
	}}
	hotSim, err := startSimulator(newSimConfig(simulator.Config{Latency: opts.SimLatency, Seed: 1}))
	if err != nil {
		return nil, err
	}
	defer hotSim.close()
	ampSim, err := startSimulator(newSimConfig(simulator.Config{Latency: opts.SimLatency, JWTLifetime: opts.AmpLifetime, Seed: 2}))
	if err != nil {
		return nil, err
	}
	defer ampSim.close()
	memSim, err := startSimulator(newSimConfig(simulator.Config{Latency: opts.SimLatency, Seed: 3}))
	if err != nil {
		return nil, err
	}
	defer memSim.close()

	e, err := newEnv(ctx, opts, hotSim, ampSim, memSim)
	if err != nil {
		return nil, err
	}
	defer e.close()

	if opts.has(PhaseOverhead) || opts.has(PhaseScaling) {
		shared := slicesMax(opts.Concurrency)
		distinct := shared
		if opts.has(PhaseScaling) {
			distinct = max(distinct, opts.ScalingMax)
		}
		h, err := e.newHotPath(ctx, hotSim, shared, distinct)
		if err != nil {
			return nil, fmt.Errorf("hot path set-up: %w", err)
		}
		if opts.has(PhaseOverhead) {
			rep.Overhead = runOverhead(ctx, opts, h)
		}
		if opts.has(PhaseScaling) {
			rep.Scaling = runScaling(ctx, opts, h)
			rep.Knees = map[string]int{}
			for _, p := range providers {
				rep.Knees[p+"/bare"] = knee(rep.Scaling, p, false)
				rep.Knees[p+"/gateway"] = knee(rep.Scaling, p, true)
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	if opts.has(PhaseAmplification) {
		if rep.Amplification, err = runAmplification(ctx, e, opts, ampSim); err != nil {
			return rep, fmt.Errorf("amplification: %w", err)
		}
	}
	if opts.has(PhaseControl) {
		if rep.Control, err = runControl(ctx, e, opts, hotSim); err != nil {
			return rep, fmt.Errorf("control plane: %w", err)
		}
	}
	if opts.has(PhaseMemory) {
		if rep.Memory, rep.MemoryProduction, err = runMemory(ctx, e, opts, memSim); err != nil {
			rep.MemoryError = err.Error()
			opts.progress("memory phase failed: " + err.Error())
		}
	}
	if opts.has(PhaseStreams) {
		if rep.Streams, err = runStreams(ctx, e, opts, memSim); err != nil {
			return rep, fmt.Errorf("streams: %w", err)
		}
	}
	if opts.has(PhaseSoak) {
		if rep.Soak, err = runSoak(ctx, e, opts, hotSim); err != nil {
			return rep, fmt.Errorf("soak: %w", err)
		}
	}
	rep.Audit = e.auditStats()
	rep.Targets = append(targets(rep), soakTargets(rep.Soak)...)
	return rep, ctx.Err()
}

// AuditStats are the production variants' audit files.
type AuditStats struct {
	Dir     string `json:"dir"`
	Files   int    `json:"files"`
	Bytes   int64  `json:"bytes"`
	Records int64  `json:"records"`
}

// auditStats counts the audit files and their records (lines), or nil if
// no production variant ran.
func (e *env) auditStats() *AuditStats {
	e.mu.Lock()
	dir := e.prodDir
	e.mu.Unlock()
	if dir == "" {
		return nil
	}
	files, _ := filepath.Glob(filepath.Join(dir, "audit-*.jsonl"))
	st := &AuditStats{Dir: dir, Files: len(files)}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		st.Bytes += int64(len(b))
		st.Records += int64(bytes.Count(b, []byte("\n")))
	}
	return st
}

func slicesMax(xs []int) int {
	m := 1
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// Target is one of the issue's targets and whether the run met it.
type Target struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	Met  bool   `json:"met"`
}

func targets(rep *Report) []Target {
	var out []Target
	for _, row := range rep.Overhead {
		for _, v := range []struct {
			name string
			s    Summary
			r    Ratios
		}{{varGateway, row.Gateway, row.GatewayRatios}, {varDistinct, row.GatewayDistinct, row.DistinctRatios}} {
			if len(v.s.Rounds) == 0 || len(row.Bare.Rounds) == 0 || len(row.Direct.Rounds) == 0 {
				continue // not run (-variants)
			}
			out = append(out, Target{
				Name: fmt.Sprintf("throughput %s/%s vs bare, %d callers", row.Provider, v.name, row.Callers),
				Want: "≥ 0.80", Got: fmt.Sprintf("%.3f", v.r.ThroughputVsBare), Met: v.r.ThroughputVsBare >= 0.8,
			})
			if v.name == varDistinct && len(v.s.Rounds) >= 5 {
				out = append(out, Target{
					Name: fmt.Sprintf("%s/%s vs bare by CPU per call (bare's ÷ the gateway's), %d callers, %d rounds", row.Provider, v.name, row.Callers, len(v.s.Rounds)),
					Want: "≥ 0.97", Got: fmt.Sprintf("%.3f", v.r.ThroughputVsBareByCPU), Met: v.r.ThroughputVsBareByCPU >= 0.97,
				})
			}
			if v.name == varDistinct && row.Callers == 1 && v.s.Rounds[0].Mode == "open" {
				out = append(out, Target{
					Name: fmt.Sprintf("added p50 %s/%s over bare, 1 caller, open loop", row.Provider, v.name),
					Want: "≤ 0.1 ms", Got: fmt.Sprintf("%.3f ms", v.r.AddedP50VsBareMs), Met: v.r.AddedP50VsBareMs <= 0.1,
				})
			}
			if row.Callers == 16 {
				out = append(out, Target{
					Name: fmt.Sprintf("added p50 %s/%s over direct, 16 callers", row.Provider, v.name),
					Want: "< 0.5 ms", Got: fmt.Sprintf("%.3f ms", v.r.AddedP50VsDirectMs), Met: v.r.AddedP50VsDirectMs < 0.5,
				})
			}
		}
	}
	if rep.Control != nil {
		for _, r := range rep.Control.Rows {
			if r.Callers != 16 {
				continue
			}
			// Not in the switch below: IssueSession production also has
			// the audit target.
			if (r.Op == opIssue || r.Op == opResolve) && r.Variant == lvlProduction && r.ThroughputVsNoop > 0 {
				out = append(out, Target{
					Name: fmt.Sprintf("%s vs a no-op unary call, both production, 16 callers", r.Op),
					Want: "≥ 0.50", Got: fmt.Sprintf("%.3f", r.ThroughputVsNoop), Met: r.ThroughputVsNoop >= 0.5,
				})
			}
			switch {
			case r.Op == opIssue && r.Variant == lvlProduction && r.Base == lvlLimits,
				r.Op == opPut && r.Variant == credProductionNoBatch && r.Base == lvlLimits:
				out = append(out, Target{
					Name: fmt.Sprintf("%s with audit (%s) vs without (limits), 16 callers", r.Op, r.Variant),
					Want: "≥ 0.80", Got: fmt.Sprintf("%.3f", r.ThroughputVsBase), Met: r.ThroughputVsBase >= 0.8,
				})
			case r.Op == opBatchPut && r.ItemsVsEncryptBatch > 0:
				out = append(out, Target{
					Name: fmt.Sprintf("BatchPutCredentials %s items/s vs transit encrypt batch of 100, 16 callers", r.Variant),
					Want: "≥ 0.50", Got: fmt.Sprintf("%.3f", r.ItemsVsEncryptBatch), Met: r.ItemsVsEncryptBatch >= 0.5,
				})
			case r.Op == opPut && (r.Variant == lvlProduction || r.Variant == credPlainBatch) && r.ThroughputVsEncrypt1 > 0:
				out = append(out, Target{
					Name: fmt.Sprintf("PutCredential %s vs transit encrypt 1 item/call, 16 callers", r.Variant),
					Want: "≥ 0.80", Got: fmt.Sprintf("%.3f", r.ThroughputVsEncrypt1), Met: r.ThroughputVsEncrypt1 >= 0.8,
				})
			}
		}
	}
	if st := rep.Streams; st != nil {
		out = append(out, Target{
			Name: fmt.Sprintf("RSS per open WatchPositions stream, %d streams on one gateway", st.Streams),
			Want: "≤ 24 KiB", Got: fmt.Sprintf("%.1f KiB (%.2f goroutines per stream, %d errors)", st.PerStreamKiB, st.GoroutinesPerStream, st.Errors),
			Met: st.PerStreamKiB <= 24 && st.Errors == 0,
		}, Target{
			Name: "upstream polls per account per interval, every stream open",
			Want: "1", Got: fmt.Sprintf("%.2f", st.PollsPerAccountPerInterval),
			Met: st.PollsPerAccountPerInterval > 0.8 && st.PollsPerAccountPerInterval < 1.2,
		})
	}
	if rep.Amplification != nil {
		for _, r := range rep.Amplification.Rows {
			if r.Client != "gateway" {
				continue
			}
			out = append(out, Target{
				Name: fmt.Sprintf("%s logins per account per lifetime, %d callers, %d %s instance(s)", r.Provider, r.Callers, r.Instances, r.Level),
				Want: "exactly 1, no errors", Got: fmt.Sprintf("%.2f (%d errors)", r.PerLifetime, r.Errors),
				Met: r.PerLifetime == 1 && r.Errors == 0,
			})
		}
	}
	return out
}
