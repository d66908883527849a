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
					v.s.ConnsPerCall, v.s.CPUPerCallUs+v.s.RedisCPUPerCallUs, v.s.Errors, ratio)
			}
		}
		w.Flush()
		fmt.Fprintln(out)
	}

	if len(rep.Scaling) > 0 {
		fmt.Fprintln(out, "5. Scaling: bare forwarder vs gateway (a credential per caller)")
		p("provider\tcallers\tbare req/s\tbare p99 ms\tbare CPU µs/call\tgateway req/s\tgateway p99 ms\tgateway CPU µs/call\tgateway/bare\t\n")
		for _, pt := range rep.Scaling {
			p("%s\t%d\t%.0f\t%.3f\t%.0f\t%.0f\t%.3f\t%.0f\t%.2f\t\n", pt.Provider, pt.Callers, pt.Bare.Throughput, pt.Bare.P99ms, pt.Bare.CPUPerCallUs+pt.Bare.RedisCPUPerCallUs,
				pt.Gateway.Throughput, pt.Gateway.P99ms, pt.Gateway.CPUPerCallUs+pt.Gateway.RedisCPUPerCallUs, pt.ThroughputVsBare)
		}
		w.Flush()
		fmt.Fprintf(out, "throughput stops growing (<10%% per doubling) after: %s\n\n", formatKnees(rep.Knees))
	}

	if a := rep.Amplification; a != nil {
		fmt.Fprintf(out, "2. Upstream amplification: JWT lifetime %.0fs (gateway safety margin %.2fs), %.0fs run, one call per caller every %.1fs\n",
			a.JWTLifetimeS, a.JWTSafetyMarginS, a.RunS, a.CallIntervalS)
		p("provider\tclient\tinstances\tcallers\tcalls\terrors\tlogins\tlifetimes\tper account per lifetime\t\n")
		for _, r := range a.Rows {
			inst := "-"
			if r.Instances > 0 {
				inst = fmt.Sprint(r.Instances)
			}
			p("%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%.2f\t\n", r.Provider, r.Client, inst, r.Callers, r.Calls, r.Errors, r.Logins, r.Lifetimes, r.PerLifetime)
		}
		w.Flush()
		fmt.Fprintln(out)
	}

	if c := rep.Control; c != nil {
		fmt.Fprintf(out, "3. Control plane (transit: %s)\n", c.Transit)
		p("operation\tcallers\tcalls/s\titems/s\tp50 ms\tp99 ms\terrors\t\n")
		for _, r := range c.Rows {
			p("%s\t%d\t%.0f\t%.0f\t%.3f\t%.3f\t%d\t\n", r.Op, r.Callers, r.Result.Throughput, r.ItemsPerSec, r.Result.P50ms, r.Result.P99ms, r.Result.Errors)
		}
		w.Flush()
		fmt.Fprintln(out)
	}

	if mem := rep.Memory; mem != nil {
		fmt.Fprintf(out, "4. Memory: `fleetbroker gateway` VmRSS, %d live handles, %d accounts in %d tenants\n", mem.Handles, mem.Accounts, mem.Tenants)
		fmt.Fprintf(out, "idle %.1f MiB, loaded %.1f MiB (max %.1f, VmHWM %.1f), ≤ %.2f KiB per handle; passes %s s; %d calls, %d errors\n\n",
			mem.IdleRSSMiB, mem.LoadedRSSMiB, mem.MaxRSSMiB, mem.HWMMiB, mem.PerHandleKiB, formatFloats(mem.PassSeconds), mem.Calls, mem.Errors)
	} else if rep.MemoryError != "" {
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
