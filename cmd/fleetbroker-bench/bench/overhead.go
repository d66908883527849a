package bench

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"google.golang.org/grpc/metadata"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

// The ways the same query (every unit's latest position) is made.
const (
	varDirect   = "direct"           // (a) HTTP straight to the simulator, hand-held sid/JWT
	varBare     = "bare"             // (b) minimal gRPC forwarder, hard-coded credentials
	varGateway  = "gateway"          // (c) gateway, one credential shared by every caller
	varDistinct = "gateway-distinct" // (c) gateway, a credential of its own per caller
	// varTuned is gateway-distinct on a second gateway whose upstream
	// transport keeps more idle connections (-gateway-idle-per-host): the
	// "after" of the connection-churn fix, interleaved with the "before".
	varTuned = "gateway-distinct-tuned"
)

// distinctAt names gateway-distinct at each security level above plain
// (production.go): the production variants of the overhead phase.
var distinctAt = map[string]string{
	lvlTLS:        "distinct+tls",
	lvlPolicy:     "distinct+policy",
	lvlLimits:     "distinct+limits",
	lvlProduction: "production",
}

// levelOf is the security level of a production variant ("" for others).
func levelOf(variant string) string {
	for l, v := range distinctAt {
		if v == variant {
			return l
		}
	}
	return ""
}

// levels returns the security levels above plain this run measures:
// none with NoProduction, and only those that need no Vault with NoVault.
func (o Options) levels() []string {
	var out []string
	for _, l := range securityLevels {
		if o.NoProduction || (o.NoVault && needsBuilders(l)) {
			continue
		}
		out = append(out, l)
	}
	return out
}

// variants returns the overhead variants of this run, in the order each
// round runs them.
func (o Options) variants() []string {
	vs := []string{varDirect, varBare, varGateway, varDistinct}
	if o.GatewayIdlePerHost > 0 {
		vs = append(vs, varTuned)
	}
	for _, l := range o.levels() {
		vs = append(vs, distinctAt[l])
	}
	var out []string
	for _, v := range vs {
		if o.hasVariant(v) {
			out = append(out, v)
		}
	}
	return out
}

// upstreamEndpoint is the simulator endpoint behind the query.
var upstreamEndpoint = map[string]string{
	provWialon:  "wialon core/search_items",
	provFleetUp: "fleetup POST /gpsdata/device-last-location",
}

// hotPath is the set-up for the overhead and scaling phases: one simulator,
// the baselines, one gateway with warm caches.
type hotPath struct {
	sim   *simHTTP
	procs procs
	ops   map[string]map[string]Op // provider → variant → op
}

const hotTenant = "bench-hot"

// newHotPath prepares every variant for up to shared callers on the shared
// credential and distinct callers with a credential each, and warms them:
// upstream sessions minted, handle resolutions cached.
func (e *env) newHotPath(ctx context.Context, sim *simHTTP, shared, distinct int) (*hotPath, error) {
	h := &hotPath{sim: sim, procs: e.procs(), ops: map[string]map[string]Op{}}
	idle := e.opts.BaselineIdlePerHost

	// (a) direct: hand-held sid and JWT.
	dw, df := wialon.New(upstreamClient(idle)), fleetup.New(upstreamClient(idle))
	hw := newAccount(sim.sim, provWialon, "hand", 0)
	hf := newAccount(sim.sim, provFleetUp, "hand", 0)
	ws, err := dw.Login(ctx, sim.url, hw.token)
	if err != nil {
		return nil, fmt.Errorf("hand-held wialon login: %w", err)
	}
	jwt, err := df.MintToken(ctx, sim.url, hf.apiKey, hf.acctID, hf.secret)
	if err != nil {
		return nil, fmt.Errorf("hand-held fleetup mint: %w", err)
	}
	fauth := fleetup.Auth{BaseURL: sim.url, APIKey: hf.apiKey, JWT: jwt.JWT, AccountID: hf.acctID}
	h.ops[provWialon] = map[string]Op{varDirect: func(ctx context.Context, _ int) error {
		_, err := dw.SearchUnits(ctx, sim.url, ws.SID)
		return err
	}}
	h.ops[provFleetUp] = map[string]Op{varDirect: func(ctx context.Context, _ int) error {
		_, err := df.LastLocations(ctx, fauth, nil)
		return err
	}}

	// (b) bare forwarder with the same hand-held credentials.
	env := provider.Env{HTTPClient: func(string) *http.Client { return upstreamClient(idle) }}
	bareW, err := newBareUpstream(wialon.NewProvider(env), sim.url, &credentialsv1.WialonUpstreamSession{Eid: ws.SID})
	if err != nil {
		return nil, err
	}
	bareF, err := newBareUpstream(fleetup.NewProvider(env), sim.url, &credentialsv1.FleetUpUpstreamSession{Jwt: jwt.JWT, ApiKey: hf.apiKey, AccountId: hf.acctID})
	if err != nil {
		return nil, err
	}
	bare, err := e.serveBare(&bareServer{byName: map[string]bareUpstream{provWialon: bareW, provFleetUp: bareF}})
	if err != nil {
		return nil, err
	}
	for _, p := range providers {
		md := metadata.Pairs(bareHeader, p)
		h.ops[p][varBare] = func(ctx context.Context, _ int) error {
			_, err := bare.GetLatestPositions(metadata.NewOutgoingContext(ctx, md), &telematicsv1.GetLatestPositionsRequest{})
			return err
		}
	}

	// (c) the gateway.
	gw, err := e.startGateway(ctx, gatewayOpts{prefix: "fbbench-hot"})
	if err != nil {
		return nil, err
	}
	tuned := gw
	if e.opts.GatewayIdlePerHost > 0 {
		if tuned, err = e.startGateway(ctx, gatewayOpts{prefix: "fbbench-hot-tuned", idlePerHost: e.opts.GatewayIdlePerHost}); err != nil {
			return nil, err
		}
	}
	// The production variants: gateway-distinct at each security level,
	// each replica in front of the credentials service of its level.
	leveled := map[string]telematicsv1.TelematicsServiceClient{}
	for _, l := range e.opts.levels() {
		if !e.opts.hasVariant(distinctAt[l]) {
			continue
		}
		e.opts.progress("hot path: gateway and credentials service at level " + l)
		if leveled[l], err = e.startGatewayAt(ctx, l, gatewayOpts{prefix: "fbbench-hot-" + l}); err != nil {
			return nil, fmt.Errorf("gateway at level %s: %w", l, err)
		}
	}
	call := func(gw telematicsv1.TelematicsServiceClient, handles []metadata.MD) Op {
		return func(ctx context.Context, w int) error {
			_, err := gw.GetLatestPositions(metadata.NewOutgoingContext(ctx, handles[w%len(handles)]), &telematicsv1.GetLatestPositionsRequest{})
			return err
		}
	}
	for _, p := range providers {
		e.opts.progress(fmt.Sprintf("hot path: %s credentials (1 shared with %d handles, %d distinct)", p, shared, distinct))
		sharedAcct := newAccount(sim.sim, p, "shrd", 0)
		if err := e.put(ctx, hotTenant, sharedAcct, sim.url); err != nil {
			return nil, err
		}
		sharedHandles := make([]metadata.MD, shared)
		if err := parallel(ctx, shared, 16, func(ctx context.Context, i int) (err error) {
			sharedHandles[i], err = e.issue(ctx, hotTenant, sharedAcct.credID)
			return err
		}); err != nil {
			return nil, err
		}
		distinctHandles := make([]metadata.MD, distinct)
		if err := parallel(ctx, distinct, 16, func(ctx context.Context, i int) error {
			a := newAccount(sim.sim, p, "dist", i)
			if err := e.put(ctx, hotTenant, a, sim.url); err != nil {
				return err
			}
			md, err := e.issue(ctx, hotTenant, a.credID)
			distinctHandles[i] = md
			return err
		}); err != nil {
			return nil, err
		}
		h.ops[p][varGateway] = call(gw, sharedHandles)
		h.ops[p][varDistinct] = call(gw, distinctHandles)
		h.ops[p][varTuned] = call(tuned, distinctHandles)
		for l, gw := range leveled {
			h.ops[p][distinctAt[l]] = call(gw, distinctHandles)
		}
	}

	// Warm every path: each distinct credential's upstream session is
	// minted and every handle's resolution cached before measuring.
	for _, p := range providers {
		for _, v := range e.opts.variants() {
			n := 1
			switch v {
			case varGateway:
				n = shared
			case varDistinct, varTuned:
				n = distinct
			}
			if levelOf(v) != "" {
				n = distinct
			}
			if err := parallel(ctx, n, 32, func(ctx context.Context, i int) error { return h.ops[p][v](ctx, i) }); err != nil {
				return nil, fmt.Errorf("warm %s %s: %w", p, v, err)
			}
		}
	}
	return h, nil
}

// measured is one measurement with what it cost.
type measured struct {
	Result
	// UpstreamPerCall is how many upstream requests the simulator served
	// per call made (warm-up included on both sides).
	UpstreamPerCall float64 `json:"upstream_requests_per_call"`
	// CPUPerCallUs is the CPU this process (callers, services, simulator)
	// used per call; RedisCPUPerCallUs is redis-server's. On a saturated
	// machine they, not wall-clock rates, say what a variant costs.
	CPUPerCallUs      float64 `json:"cpu_us_per_call"`
	RedisCPUPerCallUs float64 `json:"redis_cpu_us_per_call"`
	// VaultCPUPerCallUs is the Vault server's (0 without Vault).
	VaultCPUPerCallUs float64 `json:"vault_cpu_us_per_call"`
	// ConnsPerCall is how many new TCP connections the simulator accepted
	// per call: near 0 for a client that keeps its connections alive.
	ConnsPerCall float64 `json:"upstream_conns_per_call"`
}

// totalCPU is the CPU per call of every process involved: this one,
// redis-server and Vault.
func (m measured) totalCPU() float64 {
	return m.CPUPerCallUs + m.RedisCPUPerCallUs + m.VaultCPUPerCallUs
}

// procs are the child processes whose CPU a measurement counts.
type procs struct{ redis, vault int }

func (e *env) procs() procs {
	p := procs{redis: e.redis.pid()}
	if e.vault != nil {
		p.vault = e.vault.pid()
	}
	return p
}

// measureLoad runs op under l and measures its CPU per call in this
// process, redis-server and Vault.
func measureLoad(ctx context.Context, l Load, op Op, p procs) measured {
	cpu0, redis0, vault0 := selfCPU(), procCPU(p.redis), procCPU(p.vault)
	r := RunLoad(ctx, l, op)
	cpu1, redis1, vault1 := selfCPU(), procCPU(p.redis), procCPU(p.vault)
	m := measured{Result: r}
	if n := float64(r.TotalOps); n > 0 {
		m.CPUPerCallUs = float64((cpu1-cpu0)/time.Microsecond) / n
		m.RedisCPUPerCallUs = float64((redis1-redis0)/time.Microsecond) / n
		if p.vault > 0 {
			m.VaultCPUPerCallUs = float64((vault1-vault0)/time.Microsecond) / n
		}
	}
	return m
}

// measure runs one measurement of a variant.
func (h *hotPath) measure(ctx context.Context, l Load, provider, variant string) measured {
	before := h.sim.sim.Stats().Requests[upstreamEndpoint[provider]]
	conns0 := h.sim.conns.Load()
	m := measureLoad(ctx, l, h.ops[provider][variant], h.procs)
	conns1 := h.sim.conns.Load()
	after := h.sim.sim.Stats().Requests[upstreamEndpoint[provider]]
	if n := float64(m.TotalOps); n > 0 {
		m.UpstreamPerCall = float64(after-before) / n
		m.ConnsPerCall = float64(conns1-conns0) / n
	}
	return m
}

// Summary is a variant's figures at one concurrency: medians over rounds.
type Summary struct {
	Throughput        float64    `json:"throughput_rps"`
	P50ms             float64    `json:"p50_ms"`
	P99ms             float64    `json:"p99_ms"`
	Errors            int64      `json:"errors"`
	FirstError        string     `json:"first_error,omitempty"`
	UpstreamPerOp     float64    `json:"upstream_requests_per_call"`
	CPUPerCallUs      float64    `json:"cpu_us_per_call"`
	RedisCPUPerCallUs float64    `json:"redis_cpu_us_per_call"`
	VaultCPUPerCallUs float64    `json:"vault_cpu_us_per_call"`
	ConnsPerCall      float64    `json:"upstream_conns_per_call"`
	Rounds            []measured `json:"rounds"`
}

// totalCPU is the median CPU per call of every process involved.
func (s Summary) totalCPU() float64 {
	return s.CPUPerCallUs + s.RedisCPUPerCallUs + s.VaultCPUPerCallUs
}

func summarize(rounds []measured) Summary {
	s := Summary{Rounds: rounds}
	var thr, p50, p99, up, cpu, rcpu, vcpu, conns []float64
	for _, r := range rounds {
		thr, p50, p99 = append(thr, r.Throughput), append(p50, r.P50ms), append(p99, r.P99ms)
		up, cpu, rcpu = append(up, r.UpstreamPerCall), append(cpu, r.CPUPerCallUs), append(rcpu, r.RedisCPUPerCallUs)
		vcpu, conns = append(vcpu, r.VaultCPUPerCallUs), append(conns, r.ConnsPerCall)
		s.Errors += r.Errors
		if s.FirstError == "" {
			s.FirstError = r.FirstError
		}
	}
	s.Throughput, s.P50ms, s.P99ms = median(thr), median(p50), median(p99)
	s.UpstreamPerOp, s.CPUPerCallUs, s.RedisCPUPerCallUs, s.ConnsPerCall = median(up), median(cpu), median(rcpu), median(conns)
	s.VaultCPUPerCallUs = median(vcpu)
	return s
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Ratios compare a gateway variant with the baselines. Each is the median
// over rounds of the ratio (or difference) within a round, whose
// measurements ran back to back, so slow drifts of a shared machine cancel.
type Ratios struct {
	ThroughputVsBare   float64 `json:"throughput_vs_bare"`
	ThroughputVsDirect float64 `json:"throughput_vs_direct"`
	P50VsBare          float64 `json:"p50_vs_bare"`
	P50VsDirect        float64 `json:"p50_vs_direct"`
	P99VsBare          float64 `json:"p99_vs_bare"`
	P99VsDirect        float64 `json:"p99_vs_direct"`
	AddedP50VsDirectMs float64 `json:"added_p50_vs_direct_ms"`
	AddedP50VsBareMs   float64 `json:"added_p50_vs_bare_ms"`
	// AddedCPUVsBareUs is the CPU per call (this process + redis-server)
	// above the bare forwarder's: the gateway's own cost.
	AddedCPUVsBareUs float64 `json:"added_cpu_vs_bare_us"`
	// ThroughputVsBareByCPU is the bare forwarder's CPU per call over the
	// gateway's, paired by round: its throughput ratio were the machine
	// given to each alone, steadier than rates on a shared host.
	ThroughputVsBareByCPU float64 `json:"throughput_vs_bare_by_cpu"`
}

func ratios(gw, bare, direct Summary) Ratios {
	paired := func(f func(g, base measured) float64, base Summary) float64 {
		var xs []float64
		for i := range min(len(gw.Rounds), len(base.Rounds)) {
			xs = append(xs, f(gw.Rounds[i], base.Rounds[i]))
		}
		return median(xs)
	}
	thr := func(g, b measured) float64 { return div(g.Throughput, b.Throughput) }
	p50 := func(g, b measured) float64 { return div(g.P50ms, b.P50ms) }
	p99 := func(g, b measured) float64 { return div(g.P99ms, b.P99ms) }
	added := func(g, b measured) float64 { return g.P50ms - b.P50ms }
	cpu := func(g, b measured) float64 { return g.totalCPU() - b.totalCPU() }
	return Ratios{
		ThroughputVsBare: paired(thr, bare), ThroughputVsDirect: paired(thr, direct),
		P50VsBare: paired(p50, bare), P50VsDirect: paired(p50, direct),
		P99VsBare: paired(p99, bare), P99VsDirect: paired(p99, direct),
		AddedP50VsDirectMs: paired(added, direct), AddedP50VsBareMs: paired(added, bare),
		AddedCPUVsBareUs:      paired(cpu, bare),
		ThroughputVsBareByCPU: paired(func(g, b measured) float64 { return div(b.totalCPU(), g.totalCPU()) }, bare),
	}
}

// pairedThroughput is the median over rounds of a's throughput over b's
// in the same round.
func pairedThroughput(a, b Summary) float64 {
	var xs []float64
	for i := range min(len(a.Rounds), len(b.Rounds)) {
		xs = append(xs, div(a.Rounds[i].Throughput, b.Rounds[i].Throughput))
	}
	return median(xs)
}

// pairedAddedCPU is the median over rounds of a's CPU per call minus b's in
// the same round.
func pairedAddedCPU(a, b Summary) float64 {
	var xs []float64
	for i := range min(len(a.Rounds), len(b.Rounds)) {
		xs = append(xs, a.Rounds[i].totalCPU()-b.Rounds[i].totalCPU())
	}
	return median(xs)
}

func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// OverheadRow is one provider at one concurrency.
type OverheadRow struct {
	Provider        string  `json:"provider"`
	Callers         int     `json:"callers"`
	Direct          Summary `json:"direct"`
	Bare            Summary `json:"bare"`
	Gateway         Summary `json:"gateway"`
	GatewayDistinct Summary `json:"gateway_distinct"`
	GatewayRatios   Ratios  `json:"gateway_ratios"`
	DistinctRatios  Ratios  `json:"gateway_distinct_ratios"`
	// Tuned is only measured with -gateway-idle-per-host.
	Tuned       *Summary `json:"gateway_distinct_tuned,omitempty"`
	TunedRatios *Ratios  `json:"gateway_distinct_tuned_ratios,omitempty"`
	// Levels is gateway-distinct at each security level above plain, up to
	// production (unless NoProduction).
	Levels []LevelResult `json:"production_levels,omitempty"`
}

// LevelResult is gateway-distinct at one security level.
type LevelResult struct {
	Level   string  `json:"level"`
	Variant string  `json:"variant"`
	Summary Summary `json:"summary"`
	// Ratios are against the baselines, as for the other gateway variants.
	Ratios Ratios `json:"ratios"`
	// Base is the variant one level below (gateway-distinct below tls);
	// the VsBase figures are what this level's piece costs, paired by round.
	Base             string  `json:"base"`
	ThroughputVsBase float64 `json:"throughput_vs_base"`
	AddedCPUVsBaseUs float64 `json:"added_cpu_vs_base_us"`
	AddedP50VsBaseMs float64 `json:"added_p50_vs_base_ms"`
	// ThroughputVsPlain is over gateway-distinct (plain).
	ThroughputVsPlain float64 `json:"throughput_vs_plain"`
}

// levelResults compares each measured level with the one below it.
func levelResults(sum func(variant string) Summary, bare, direct Summary) []LevelResult {
	var out []LevelResult
	base, plain := varDistinct, sum(varDistinct)
	for _, l := range securityLevels {
		v := distinctAt[l]
		s := sum(v)
		if len(s.Rounds) == 0 {
			continue
		}
		b := sum(base)
		r := LevelResult{Level: l, Variant: v, Summary: s, Ratios: ratios(s, bare, direct), Base: base,
			ThroughputVsBase: pairedThroughput(s, b), AddedCPUVsBaseUs: pairedAddedCPU(s, b),
			AddedP50VsBaseMs: ratios(s, b, b).AddedP50VsBareMs, ThroughputVsPlain: pairedThroughput(s, plain)}
		out = append(out, r)
		base = v
	}
	return out
}

// runOverhead measures every variant at every concurrency, interleaved:
// round after round, each (concurrency, provider) cell runs a, b, c, c'
// back to back, so machine noise falls on all of them alike.
func runOverhead(ctx context.Context, opts Options, h *hotPath) []OverheadRow {
	type key struct {
		p, v string
		c    int
	}
	results := map[key][]measured{}
	for round := range opts.Rounds {
		for _, c := range opts.Concurrency {
			for _, p := range providers {
				for _, v := range opts.variants() {
					if ctx.Err() != nil {
						return nil
					}
					m := h.measure(ctx, opts.load(c), p, v)
					k := key{p, v, c}
					results[k] = append(results[k], m)
					opts.progress(fmt.Sprintf("overhead round %d/%d  %-7s %4d callers  %-22s %7.0f req/s  p50 %7.3f ms  p99 %7.3f ms  upstream/call %.2f  conns/call %.2f  cpu/call %5.0f+%3.0f µs  errors %d",
						round+1, opts.Rounds, p, c, v, m.Throughput, m.P50ms, m.P99ms, m.UpstreamPerCall, m.ConnsPerCall, m.CPUPerCallUs, m.RedisCPUPerCallUs, m.Errors))
				}
			}
		}
	}
	var rows []OverheadRow
	for _, p := range providers {
		for _, c := range opts.Concurrency {
			s := func(v string) Summary { return summarize(results[key{p, v, c}]) }
			row := OverheadRow{Provider: p, Callers: c, Direct: s(varDirect), Bare: s(varBare), Gateway: s(varGateway), GatewayDistinct: s(varDistinct)}
			row.GatewayRatios = ratios(row.Gateway, row.Bare, row.Direct)
			row.DistinctRatios = ratios(row.GatewayDistinct, row.Bare, row.Direct)
			if t := s(varTuned); len(t.Rounds) > 0 {
				r := ratios(t, row.Bare, row.Direct)
				row.Tuned, row.TunedRatios = &t, &r
			}
			row.Levels = levelResults(s, row.Bare, row.Direct)
			rows = append(rows, row)
		}
	}
	return rows
}

// ScalingPoint is one concurrency of the scaling curve.
type ScalingPoint struct {
	Provider string  `json:"provider"`
	Callers  int     `json:"callers"`
	Bare     Summary `json:"bare"`
	Gateway  Summary `json:"gateway_distinct"`
	// ThroughputVsBare is the gateway's throughput over the bare baseline's.
	ThroughputVsBare float64 `json:"throughput_vs_bare"`
	// Production is gateway-distinct at the production level (unless
	// NoProduction), and its throughput over the bare baseline's.
	Production          *Summary `json:"production,omitempty"`
	ProductionVsBare    float64  `json:"production_vs_bare,omitempty"`
	ProductionVsGateway float64  `json:"production_vs_gateway_distinct,omitempty"`
}

// runScaling doubles the callers from 1 to opts.ScalingMax, measuring the
// bare forwarder and the gateway with a credential per caller (the same
// upstream work per call) interleaved.
func runScaling(ctx context.Context, opts Options, h *hotPath) []ScalingPoint {
	var points []ScalingPoint
	for c := 1; c <= opts.ScalingMax; c *= 2 {
		for _, p := range providers {
			if ctx.Err() != nil {
				return points
			}
			_, production := h.ops[p][distinctAt[lvlProduction]]
			var bare, gw, prod []measured
			for range opts.ScalingRounds {
				bare = append(bare, h.measure(ctx, opts.load(c), p, varBare))
				gw = append(gw, h.measure(ctx, opts.load(c), p, varDistinct))
				if production {
					prod = append(prod, h.measure(ctx, opts.load(c), p, distinctAt[lvlProduction]))
				}
			}
			pt := ScalingPoint{Provider: p, Callers: c, Bare: summarize(bare), Gateway: summarize(gw)}
			pt.ThroughputVsBare = ratios(pt.Gateway, pt.Bare, pt.Bare).ThroughputVsBare
			line := fmt.Sprintf("scaling %-7s %4d callers  bare %9.0f req/s p99 %7.3f ms | gateway %9.0f req/s p99 %7.3f ms (%.2f×)",
				p, c, pt.Bare.Throughput, pt.Bare.P99ms, pt.Gateway.Throughput, pt.Gateway.P99ms, pt.ThroughputVsBare)
			if production {
				s := summarize(prod)
				pt.Production, pt.ProductionVsBare, pt.ProductionVsGateway = &s, pairedThroughput(s, pt.Bare), pairedThroughput(s, pt.Gateway)
				line += fmt.Sprintf(" | production %9.0f req/s p99 %7.3f ms (%.2f×)", s.Throughput, s.P99ms, pt.ProductionVsBare)
			}
			opts.progress(line)
			points = append(points, pt)
		}
	}
	return points
}

// knee is the first concurrency whose doubling gained less than 10 %
// throughput: where the curve bends.
func knee(points []ScalingPoint, provider string, gateway bool) int {
	prev := 0.0
	prevC := 0
	for _, p := range points {
		if p.Provider != provider {
			continue
		}
		t := p.Bare.Throughput
		if gateway {
			t = p.Gateway.Throughput
		}
		if prevC > 0 && t < prev*1.10 {
			return prevC
		}
		prev, prevC = t, p.Callers
	}
	return prevC
}
