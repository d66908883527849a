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

// variants returns the overhead variants of this run, in the order each
// round runs them.
func (o Options) variants() []string {
	vs := []string{varDirect, varBare, varGateway, varDistinct}
	if o.GatewayIdlePerHost > 0 {
		vs = append(vs, varTuned)
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
	sim      *simHTTP
	redisPID int
	ops      map[string]map[string]Op // provider → variant → op
}

const hotTenant = "bench-hot"

// newHotPath prepares every variant for up to shared callers on the shared
// credential and distinct callers with a credential each, and warms them:
// upstream sessions minted, handle resolutions cached.
func (e *env) newHotPath(ctx context.Context, sim *simHTTP, shared, distinct int) (*hotPath, error) {
	h := &hotPath{sim: sim, redisPID: e.redis.p.pid(), ops: map[string]map[string]Op{}}
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
	// ConnsPerCall is how many new TCP connections the simulator accepted
	// per call: near 0 for a client that keeps its connections alive.
	ConnsPerCall float64 `json:"upstream_conns_per_call"`
}

// measure runs one measurement of a variant.
func (h *hotPath) measure(ctx context.Context, l Load, provider, variant string) measured {
	before := h.sim.sim.Stats().Requests[upstreamEndpoint[provider]]
	cpu0, redis0, conns0 := selfCPU(), procCPU(h.redisPID), h.sim.conns.Load()
	r := RunLoad(ctx, l, h.ops[provider][variant])
	cpu1, redis1, conns1 := selfCPU(), procCPU(h.redisPID), h.sim.conns.Load()
	after := h.sim.sim.Stats().Requests[upstreamEndpoint[provider]]
	m := measured{Result: r}
	if n := float64(r.TotalOps); n > 0 {
		m.UpstreamPerCall = float64(after-before) / n
		m.CPUPerCallUs = float64((cpu1-cpu0)/time.Microsecond) / n
		m.RedisCPUPerCallUs = float64((redis1-redis0)/time.Microsecond) / n
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
	ConnsPerCall      float64    `json:"upstream_conns_per_call"`
	Rounds            []measured `json:"rounds"`
}

func summarize(rounds []measured) Summary {
	s := Summary{Rounds: rounds}
	var thr, p50, p99, up, cpu, rcpu, conns []float64
	for _, r := range rounds {
		thr, p50, p99 = append(thr, r.Throughput), append(p50, r.P50ms), append(p99, r.P99ms)
		up, cpu, rcpu = append(up, r.UpstreamPerCall), append(cpu, r.CPUPerCallUs), append(rcpu, r.RedisCPUPerCallUs)
		conns = append(conns, r.ConnsPerCall)
		s.Errors += r.Errors
		if s.FirstError == "" {
			s.FirstError = r.FirstError
		}
	}
	s.Throughput, s.P50ms, s.P99ms = median(thr), median(p50), median(p99)
	s.UpstreamPerOp, s.CPUPerCallUs, s.RedisCPUPerCallUs, s.ConnsPerCall = median(up), median(cpu), median(rcpu), median(conns)
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
	cpu := func(g, b measured) float64 {
		return g.CPUPerCallUs + g.RedisCPUPerCallUs - b.CPUPerCallUs - b.RedisCPUPerCallUs
	}
	return Ratios{
		ThroughputVsBare: paired(thr, bare), ThroughputVsDirect: paired(thr, direct),
		P50VsBare: paired(p50, bare), P50VsDirect: paired(p50, direct),
		P99VsBare: paired(p99, bare), P99VsDirect: paired(p99, direct),
		AddedP50VsDirectMs: paired(added, direct), AddedP50VsBareMs: paired(added, bare),
		AddedCPUVsBareUs: paired(cpu, bare),
	}
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
			var bare, gw []measured
			for range opts.ScalingRounds {
				bare = append(bare, h.measure(ctx, opts.load(c), p, varBare))
				gw = append(gw, h.measure(ctx, opts.load(c), p, varDistinct))
			}
			pt := ScalingPoint{Provider: p, Callers: c, Bare: summarize(bare), Gateway: summarize(gw)}
			pt.ThroughputVsBare = ratios(pt.Gateway, pt.Bare, pt.Bare).ThroughputVsBare
			opts.progress(fmt.Sprintf("scaling %-7s %4d callers  bare %9.0f req/s p99 %7.3f ms | gateway %9.0f req/s p99 %7.3f ms (%.2f×)",
				p, c, pt.Bare.Throughput, pt.Bare.P99ms, pt.Gateway.Throughput, pt.Gateway.P99ms, pt.ThroughputVsBare))
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
