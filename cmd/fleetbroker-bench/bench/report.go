package bench

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteText prints rep as tables for people.
func WriteText(out io.Writer, rep *Report) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	m := rep.Machine
	fmt.Fprintf(out, "fleetbroker bench, %s\n%s, %d CPUs (GOMAXPROCS %d), %s RAM, Linux %s, %s\n\n",
		rep.Date, m.CPU, m.CPUs, m.GOMAXPROCS, m.MemTotal, m.Kernel, m.GoVersion)

	if len(rep.Overhead) > 0 {
		fmt.Fprintln(out, "1. Gateway overhead: every unit's latest position (50 units); medians over rounds")
		p("provider\tcallers\tvariant\treq/s\tp50 ms\tp99 ms\tupstream/call\tconns/call\tCPU µs/call\terrors\tthr/bare\tthr/direct\tp50/direct\t+p50 ms vs direct\t+CPU µs vs bare\t\n")
		for _, row := range rep.Overhead {
			type variant struct {
				name string
				s    Summary
				r    *Ratios
			}
			vs := []variant{{varDirect, row.Direct, nil}, {varBare, row.Bare, nil}, {varGateway, row.Gateway, &row.GatewayRatios}, {varDistinct, row.GatewayDistinct, &row.DistinctRatios}}
			if row.Tuned != nil {
				vs = append(vs, variant{varTuned, *row.Tuned, row.TunedRatios})
			}
			for _, l := range row.Levels {
				vs = append(vs, variant{l.Variant, l.Summary, &l.Ratios})
			}
			for _, v := range vs {
				if len(v.s.Rounds) == 0 {
					continue // not run (-variants)
				}
				ratio := "\t\t\t\t"
				if v.r != nil {
					ratio = fmt.Sprintf("%s\t%s\t%s\t%s\t%s", orDash(row.Bare, "%.2f", v.r.ThroughputVsBare), orDash(row.Direct, "%.2f", v.r.ThroughputVsDirect),
						orDash(row.Direct, "%.2f", v.r.P50VsDirect), orDash(row.Direct, "%+.3f", v.r.AddedP50VsDirectMs), orDash(row.Bare, "%+.0f", v.r.AddedCPUVsBareUs))
				}
				p("%s\t%d\t%s\t%.0f\t%.3f\t%.3f\t%.2f\t%.2f\t%.0f\t%d\t%s\t\n", row.Provider, row.Callers, v.name, v.s.Throughput, v.s.P50ms, v.s.P99ms, v.s.UpstreamPerOp,
					v.s.ConnsPerCall, v.s.totalCPU(), v.s.Errors, ratio)
			}
		}
		w.Flush()
		fmt.Fprintln(out)
		writeLevels(out, rep.Overhead)
	}

	if len(rep.Scaling) > 0 {
		fmt.Fprintln(out, "5. Scaling: bare forwarder vs gateway (a credential per caller), plain and production")
		p("provider\tcallers\tbare req/s\tbare p99 ms\tbare CPU µs/call\tgateway req/s\tgateway p99 ms\tgateway CPU µs/call\tgateway/bare\tproduction req/s\tproduction p99 ms\tproduction CPU µs/call\tproduction/bare\tproduction/gateway\t\n")
		for _, pt := range rep.Scaling {
			prod := "-\t-\t-\t-\t-"
			if s := pt.Production; s != nil {
				prod = fmt.Sprintf("%.0f\t%.3f\t%.0f\t%.2f\t%.2f", s.Throughput, s.P99ms, s.totalCPU(), pt.ProductionVsBare, pt.ProductionVsGateway)
			}
			p("%s\t%d\t%.0f\t%.3f\t%.0f\t%.0f\t%.3f\t%.0f\t%.2f\t%s\t\n", pt.Provider, pt.Callers, pt.Bare.Throughput, pt.Bare.P99ms, pt.Bare.totalCPU(),
				pt.Gateway.Throughput, pt.Gateway.P99ms, pt.Gateway.totalCPU(), pt.ThroughputVsBare, prod)
		}
		w.Flush()
		fmt.Fprintf(out, "throughput stops growing (<10%% per doubling) after: %s\n\n", formatKnees(rep.Knees))
	}

	if a := rep.Amplification; a != nil {
		fmt.Fprintf(out, "2. Upstream amplification: JWT lifetime %.0fs (gateway safety margin %.2fs), %.0fs run, one call per caller every %.1fs\n",
			a.JWTLifetimeS, a.JWTSafetyMarginS, a.RunS, a.CallIntervalS)
		p("provider\tclient\tlevel\tinstances\tcallers\tcalls\terrors\tlogins\tlifetimes\tper account per lifetime\t\n")
		for _, r := range a.Rows {
			inst, level := "-", "-"
			if r.Instances > 0 {
				inst = fmt.Sprint(r.Instances)
			}
			if r.Level != "" {
				level = r.Level
			}
			p("%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%.2f\t\n", r.Provider, r.Client, level, inst, r.Callers, r.Calls, r.Errors, r.Logins, r.Lifetimes, r.PerLifetime)
		}
		w.Flush()
		fmt.Fprintln(out)
	}

	if c := rep.Control; c != nil {
		fmt.Fprintf(out, "3. Control plane (transit: %s; batching of plain+batch and production: %s); medians over %d interleaved rounds; CPU = this process + redis + vault\n",
			c.Transit, c.TransitBatch, c.Rounds)
		p("operation\tvariant\tcallers\tcalls/s\titems/s\tp50 ms\tp99 ms\tCPU µs/call\tvault CPU µs/call\terrors\tvs\tthr/vs\t+CPU µs vs\tthr/plain\tthr/no-op\tthr/encrypt(1)\titems/encrypt(100)\ttransit calls/call\titems/transit call\t\n")
		for _, r := range c.Rows {
			opt := func(format string, x float64) string {
				if x == 0 {
					return "-"
				}
				return fmt.Sprintf(format, x)
			}
			base := r.Base
			if base == "" {
				base = "-"
			}
			p("%s\t%s\t%d\t%.0f\t%.0f\t%.3f\t%.3f\t%.0f\t%.0f\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Op, r.Variant, r.Callers, r.Summary.Throughput, r.ItemsPerSec,
				r.Summary.P50ms, r.Summary.P99ms, r.Summary.totalCPU(), r.Summary.VaultCPUPerCallUs, r.Summary.Errors, base,
				opt("%.2f", r.ThroughputVsBase), opt("%+.0f", r.AddedCPUVsBaseUs), opt("%.2f", r.ThroughputVsPlain), opt("%.2f", r.ThroughputVsNoop), opt("%.2f", r.ThroughputVsEncrypt1), opt("%.2f", r.ItemsVsEncryptBatch),
				opt("%.2f", r.TransitCallsPerCall), opt("%.1f", r.ItemsPerTransitCall))
		}
		w.Flush()
		fmt.Fprintln(out)
		writeAuditSyncs(out, c.Rows)
	}

	for _, mem := range []*MemoryReport{rep.Memory, rep.MemoryProduction} {
		if mem == nil {
			continue
		}
		fmt.Fprintf(out, "4. Memory (%s): `fleetbroker gateway` VmRSS, %d live handles, %d accounts in %d tenants\n", mem.Level, mem.Handles, mem.Accounts, mem.Tenants)
		fmt.Fprintf(out, "idle %.1f MiB, loaded %.1f MiB (max %.1f, VmHWM %.1f), ≤ %.2f KiB per handle; passes %s s; %d calls, %d errors\n\n",
			mem.IdleRSSMiB, mem.LoadedRSSMiB, mem.MaxRSSMiB, mem.HWMMiB, mem.PerHandleKiB, formatFloats(mem.PassSeconds), mem.Calls, mem.Errors)
	}
	if st := rep.Streams; st != nil {
		fmt.Fprintf(out, "6. Streams: %d WatchPositions streams (min_interval %.0fs) on one `fleetbroker gateway` over %d connections, %d handles, %d accounts, %d tenants\n",
			st.Streams, st.IntervalS, st.Connections, st.Handles, st.Accounts, st.Tenants)
		fmt.Fprintf(out, "VmRSS %.1f → %.1f MiB (VmHWM %.1f): %.1f KiB per stream (Go heap in use %.1f, stacks %.1f); goroutines %d → %d (%.2f per stream); opened in %.1fs; %.2f upstream polls per account per interval; %d messages, %d errors\n\n",
			st.Before.RSSMiB, st.With.RSSMiB, st.HWMMiB, st.PerStreamKiB, st.HeapPerStreamKiB, st.StackPerStreamKiB, st.Before.Goroutines, st.With.Goroutines, st.GoroutinesPerStream,
			st.OpenSeconds, st.PollsPerAccountPerInterval, st.Messages, st.Errors)
	}
	if rep.MemoryError != "" {
		fmt.Fprintf(out, "4. Memory: not measured: %s\n\n", rep.MemoryError)
	}

	writeSoakText(out, rep.Soak)
	if len(rep.Targets) > 0 {
		fmt.Fprintln(out, "Targets")
		for _, t := range rep.Targets {
			mark := "MET "
			if !t.Met {
				mark = "MISS"
			}
			fmt.Fprintf(out, "  %s  %-62s want %-20s got %s\n", mark, t.Name, t.Want, t.Got)
		}
	}
	return w.Flush()
}

// writeLevels prints what each security level adds to gateway-distinct.
func writeLevels(out io.Writer, rows []OverheadRow) {
	if len(rows) == 0 || len(rows[0].Levels) == 0 {
		return
	}
	fmt.Fprintln(out, "1b. Production wiring, piece by piece: gateway-distinct at each security level; \"vs\" is the level below, paired by round")
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "provider\tcallers\tlevel\treq/s\tp50 ms\tp99 ms\tCPU µs/call\terrors\tvs\tthr/vs\t+CPU µs vs\t+p50 ms vs\tthr/plain\tthr/bare\t\n")
	for _, row := range rows {
		for _, l := range row.Levels {
			fmt.Fprintf(w, "%s\t%d\t%s\t%.0f\t%.3f\t%.3f\t%.0f\t%d\t%s\t%.2f\t%+.0f\t%+.3f\t%.2f\t%s\t\n", row.Provider, row.Callers, l.Level,
				l.Summary.Throughput, l.Summary.P50ms, l.Summary.P99ms, l.Summary.totalCPU(), l.Summary.Errors, l.Base,
				l.ThroughputVsBase, l.AddedCPUVsBaseUs, l.AddedP50VsBaseMs, l.ThroughputVsPlain, orDash(row.Bare, "%.2f", l.Ratios.ThroughputVsBare))
		}
	}
	w.Flush()
	fmt.Fprintln(out)
}

// orDash formats x, or "-" if the baseline it is relative to was not run.
func orDash(base Summary, format string, x float64) string {
	if len(base.Rounds) == 0 {
		return "-"
	}
	return fmt.Sprintf(format, x)
}

func formatKnees(k map[string]int) string {
	var parts []string
	for _, prov := range providers {
		for _, v := range []string{"bare", "gateway"} {
			parts = append(parts, fmt.Sprintf("%s/%s %d callers", prov, v, k[prov+"/"+v]))
		}
	}
	return strings.Join(parts, ", ")
}

func formatFloats(xs []float64) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(parts, ", ")
}

// writeAuditSyncs prints the production variants' group commit.
func writeAuditSyncs(out io.Writer, rows []ControlRow) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	shown := false
	for _, r := range rows {
		if r.AuditSyncsPerCall == 0 {
			continue
		}
		if !shown {
			fmt.Fprintln(out, "3b. Audit trail (production variants): records per fsync, fsyncs per call, mean fsync")
			fmt.Fprintf(w, "operation\tvariant\tcallers\trecords/fsync\tfsyncs/call\tfsync ms\t\n")
			shown = true
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%.1f\t%.2f\t%.3f\t\n", r.Op, r.Variant, r.Callers, r.AuditRecordsPerSync, r.AuditSyncsPerCall, r.AuditSyncMs)
	}
	w.Flush()
	if shown {
		fmt.Fprintln(out)
	}
}
