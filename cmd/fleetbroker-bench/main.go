// Command fleetbroker-bench measures the gateway against a direct HTTP call
// and a bare gRPC forwarder, upstream login amplification, the control
// plane, the gateway's memory and its scaling curve, on a real redis-server
// and a real Vault dev server it starts on loopback, each phase also with
// the services wired as in production (mTLS, policy, rate limits, audit
// file), piece by piece. See docs/benchmarks.md.
//
//	go run ./cmd/fleetbroker-bench                  # the documented run, ~5 min
//	go run ./cmd/fleetbroker-bench -json > out.json # machine-readable
//	go run ./cmd/fleetbroker-bench -phases overhead -duration 3s -cpuprofile cpu.out
//	go run ./cmd/fleetbroker-bench -phases soak     # 10 min at 70 % of the peak: RSS, goroutines, FDs
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker-bench/bench"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fleetbroker-bench:", err)
		os.Exit(1)
	}
}

func run() error {
	opts := bench.DefaultOptions()
	fs := flag.NewFlagSet("fleetbroker-bench", flag.ContinueOnError)
	phases := fs.String("phases", strings.Join(bench.AllPhases, ","), "comma-separated phases to run: "+strings.Join(bench.AllPhases, ", ")+
		"; and "+bench.PhaseSoak+" (not in the default run: 10 minutes at 70% of the measured peak)")
	fs.DurationVar(&opts.Warmup, "warmup", opts.Warmup, "warm-up of each measurement (not recorded)")
	fs.DurationVar(&opts.Duration, "duration", opts.Duration, "recorded time of each measurement")
	fs.IntVar(&opts.Rounds, "rounds", opts.Rounds, "interleaved rounds of the overhead phase (medians are reported)")
	concurrency := fs.String("concurrency", joinInts(opts.Concurrency), "concurrent callers of the overhead phase")
	variants := fs.String("variants", "", "overhead variants to run (default all): direct, bare, gateway, gateway-distinct, distinct+tls, distinct+policy, distinct+limits, production")
	fs.Float64Var(&opts.Rate, "rate", 0, "open loop: requests per second per measurement, latency from the scheduled send time (0: closed loop)")
	fs.DurationVar(&opts.SimLatency, "sim-latency", 0, "reply latency the simulators add to every upstream request")
	fs.IntVar(&opts.ScalingMax, "scaling-max", opts.ScalingMax, "largest caller count of the scaling curve (doubling from 1)")
	fs.IntVar(&opts.ScalingRounds, "scaling-rounds", opts.ScalingRounds, "rounds per scaling point")
	control := fs.String("control-concurrency", joinInts(opts.ControlConcurrency), "concurrent callers of the control-plane phase")
	controlOps := fs.String("control-ops", "", "control-plane operations to run (default all): IssueSession, ResolveSession, PutCredential, BatchPutCredentials, and the references (e.g. \"no-op unary (reference)\"); -variants also filters its variants (plain, plain+batch, tls, policy, limits, production-nobatch, production)")
	fs.DurationVar(&opts.AmpLifetime, "amp-lifetime", opts.AmpLifetime, "FleetUp JWT lifetime in the amplification phase")
	fs.DurationVar(&opts.AmpDuration, "amp-duration", opts.AmpDuration, "length of each amplification run")
	fs.DurationVar(&opts.AmpInterval, "amp-interval", opts.AmpInterval, "time between two calls of one amplification caller")
	ampCallers := fs.String("amp-callers", joinInts(opts.AmpCallers), "caller counts of the amplification phase")
	ampInstances := fs.String("amp-instances", joinInts(opts.AmpInstances), "gateway replica counts of the amplification phase")
	fs.IntVar(&opts.MemHandles, "mem-handles", opts.MemHandles, "live handles in the memory phase")
	fs.IntVar(&opts.MemAccounts, "mem-accounts", opts.MemAccounts, "cached accounts in the memory phase")
	fs.DurationVar(&opts.MemHold, "mem-hold", opts.MemHold, "how long the memory phase keeps every handle warm")
	fs.StringVar(&opts.FleetbrokerBin, "fleetbroker-bin", "", "fleetbroker binary for the memory, streams and soak phases (default: go build ./cmd/fleetbroker)")
	fs.IntVar(&opts.Streams, "streams", opts.Streams, "WatchPositions streams the streams phase opens on one gateway")
	fs.DurationVar(&opts.Soak.Duration, "soak-duration", opts.Soak.Duration, "how long the soak phase runs at its target rate")
	fs.DurationVar(&opts.Soak.Interval, "soak-interval", opts.Soak.Interval, "how often the soak phase samples each process's RSS, goroutines and open FDs")
	fs.Float64Var(&opts.Soak.Share, "soak-share", opts.Soak.Share, "the soak's rate as a share of the peak it measures first")
	fs.BoolVar(&opts.NoVault, "no-vault", false, "use the dev keyring instead of Vault (no Vault figures, no memory phase)")
	fs.BoolVar(&opts.QuietServices, "quiet-services", false, "discard the services' logs instead of encoding them (JSON, info) into io.Discard")
	fs.IntVar(&opts.BaselineIdlePerHost, "baseline-idle-per-host", opts.BaselineIdlePerHost, "keep-alive pool per host of the direct caller and the bare forwarder")
	fs.IntVar(&opts.GatewayIdlePerHost, "gateway-idle-per-host", 0, "build the hot-path gateway with this many idle upstream connections per host (0: exactly as app.NewGatewayService, Go's default of 2)")
	fs.BoolVar(&opts.NoProduction, "no-production", false, "skip the production variants (mTLS, policy, rate limits, audit file: what `fleetbroker credentials|gateway` run)")
	fs.StringVar(&opts.AuditDir, "audit-dir", "", "directory of the production variants' audit files (default: the system's temporary directory); put it on the disk whose fsync you want measured, not a tmpfs")
	fs.IntVar(&opts.TransitBatch.MaxItems, "transit-batch-size", opts.TransitBatch.MaxItems, "transit batching of the plain+batch and production credentials variants: most items per Vault call (1: off), as the credentials service's --transit-batch-size")
	fs.IntVar(&opts.TransitBatch.MaxInFlight, "transit-batch-calls", opts.TransitBatch.MaxInFlight, "transit batching: Vault calls of one operation under way at once, as --transit-batch-calls")
	fs.DurationVar(&opts.TransitBatch.MaxWait, "transit-batch-wait", 0, "transit batching: hold a batch this long for more calls, as --transit-batch-wait")
	asJSON := fs.Bool("json", false, "print the report as JSON on stdout (progress stays on stderr)")
	jsonOut := fs.String("json-out", "", "also write the JSON report to this file")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run (bench, services and simulators share the process) to this file")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	opts.Phases = splitList(*phases)
	opts.Variants = splitList(*variants)
	opts.ControlOps = splitList(*controlOps)
	for _, p := range opts.Phases {
		if !contains(bench.AllPhases, p) && p != bench.PhaseSoak {
			return fmt.Errorf("-phases: unknown phase %q (have %s, %s)", p, strings.Join(bench.AllPhases, ", "), bench.PhaseSoak)
		}
	}
	var err error
	for _, l := range []struct {
		name string
		in   string
		out  *[]int
	}{{"concurrency", *concurrency, &opts.Concurrency}, {"control-concurrency", *control, &opts.ControlConcurrency},
		{"amp-callers", *ampCallers, &opts.AmpCallers}, {"amp-instances", *ampInstances, &opts.AmpInstances}} {
		if *l.out, err = parseInts(l.in); err != nil {
			return fmt.Errorf("-%s: %w", l.name, err)
		}
	}
	if opts.Rounds < 1 || opts.ScalingRounds < 1 || opts.Duration <= 0 || opts.Warmup < 0 {
		return errors.New("-rounds and -scaling-rounds must be at least 1, -duration positive, -warmup not negative")
	}
	if opts.TransitBatch.MaxItems < 1 || opts.TransitBatch.MaxInFlight < 1 || opts.TransitBatch.MaxWait < 0 {
		return errors.New("-transit-batch-size and -transit-batch-calls must be at least 1, -transit-batch-wait not negative")
	}
	if opts.Soak.Duration <= 0 || opts.Soak.Interval <= 0 || opts.Soak.Share <= 0 || opts.Soak.Share > 1 {
		return errors.New("-soak-duration and -soak-interval must be positive, -soak-share in (0, 1]")
	}
	if !*quiet {
		opts.Progress = os.Stderr
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	rep, runErr := bench.Run(ctx, opts)
	if rep == nil {
		return runErr
	}
	if *jsonOut != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else if err := bench.WriteText(os.Stdout, rep); err != nil {
		return err
	}
	return runErr
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, p := range splitList(s) {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", p)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

func joinInts(xs []int) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = strconv.Itoa(x)
	}
	return strings.Join(parts, ",")
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}
