package bench

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// PhaseSoak is the long soak: the real `fleetbroker credentials` and
// `fleetbroker gateway` under mixed load at a share of the peak measured
// first, for minutes, sampling each process's resident memory, goroutines
// and open file descriptors. It is not in AllPhases (the documented run):
// run it with -phases soak.
const PhaseSoak = "soak"

// SoakOptions configure the soak phase.
type SoakOptions struct {
	// Duration is how long the load runs at the target rate.
	Duration time.Duration
	// Interval is how often each process is sampled.
	Interval time.Duration
	// Share of the measured peak to run at (0.7: 70 %).
	Share float64
	// ProbeDuration is each step of the peak search (closed loop at
	// ProbeCallers).
	ProbeDuration time.Duration
	ProbeCallers  []int
	// Accounts whose handles the gateway reads serve.
	Accounts int
}

// DefaultSoakOptions is the issue's soak: 10 minutes at about 70 % of the
// measured peak, sampled every 10 s.
func DefaultSoakOptions() SoakOptions {
	return SoakOptions{Duration: 10 * time.Minute, Interval: 10 * time.Second, Share: 0.7,
		ProbeDuration: 3 * time.Second, ProbeCallers: []int{8, 32, 128}, Accounts: 20}
}

// SoakReport is the soak phase.
type SoakReport struct {
	Binary string `json:"binary"`
	// Mix is the share of each call in the load.
	Mix map[string]float64 `json:"mix"`
	// Peak is the closed-loop throughput of the mix at each probed caller
	// count; PeakRPS the best, TargetRPS the soak's open-loop rate.
	Peak      []Result `json:"peak"`
	PeakRPS   float64  `json:"peak_rps"`
	TargetRPS float64  `json:"target_rps"`
	// Result is the soak itself (open loop at TargetRPS).
	Result  Result           `json:"result"`
	Calls   map[string]int64 `json:"calls"`
	Samples []SoakSample     `json:"samples"`
	// Growth is, per process and measure, the floor of the last samples
	// against that of the first after the warm-up.
	Growth []SoakGrowth `json:"growth"`
}

// SoakSample is one reading of one process.
type SoakSample struct {
	ElapsedS   float64 `json:"elapsed_s"`
	Process    string  `json:"process"`
	RSSMiB     float64 `json:"rss_mib"`
	Goroutines int     `json:"goroutines"`
	FDs        int     `json:"open_fds"`
}

// SoakGrowth compares the start and the end of the soak for one measure.
type SoakGrowth struct {
	Process string  `json:"process"`
	Measure string  `json:"measure"`
	First   float64 `json:"first"`
	Last    float64 `json:"last"`
	// Limit is what Last may reach and still count as flat.
	Limit float64 `json:"limit"`
	Flat  bool    `json:"flat"`
}

// soakWindow is the fewest samples that make the first and the last
// figure (a tenth of the run, when that is more).
const soakWindow = 3

// soakFlat says how far a measure may grow and still be flat: a share
// plus an allowance (a heap reaching its GC target, a grown pool), far
// below what a leak per call or per stream adds over minutes.
var soakFlat = []struct {
	measure          string
	share, allowance float64
	of               func(SoakSample) float64
}{
	{"rss_mib", 0.20, 16, func(s SoakSample) float64 { return s.RSSMiB }},
	{"goroutines", 0.20, 20, func(s SoakSample) float64 { return float64(s.Goroutines) }},
	{"open_fds", 0.10, 10, func(s SoakSample) float64 { return float64(s.FDs) }},
}

// soakTenant holds the soak's accounts; soakPrefix its Redis keys.
const (
	soakTenant = "bench-soak"
	soakPrefix = "fbbench-soak"
)

// soakProc is one service process of the soak.
type soakProc struct {
	name        string
	addr        string
	metricsAddr string
	p           *proc
}

func runSoak(ctx context.Context, e *env, opts Options, sim *simHTTP) (*SoakReport, error) {
	if e.vault == nil {
		return nil, errors.New("the soak phase runs the real services, which need Vault (not -no-vault)")
	}
	so := opts.Soak
	bin := opts.FleetbrokerBin
	if bin == "" {
		dir, err := os.MkdirTemp("", "fleetbroker-bench-bin-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		opts.progress("soak: go build ./cmd/fleetbroker")
		if bin, err = buildFleetbroker(ctx, dir); err != nil {
			return nil, err
		}
	}
	rep := &SoakReport{Binary: bin, Calls: map[string]int64{}}
	dir, err := os.MkdirTemp("", "fleetbroker-bench-soak-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	files, err := writeSoakFiles(dir)
	if err != nil {
		return nil, err
	}

	creds, err := startSoakProc(ctx, e, bin, "credentials", files, "",
		"--policy", files.policy, "--vault-transit-key", credentialsKey)
	if err != nil {
		return nil, err
	}
	defer creds.p.Stop()
	gw, err := startSoakProc(ctx, e, bin, "gateway", files, files.gatewayKey,
		"--credentials-addr", creds.addr, "--credentials-insecure", "--vault-transit-key", gatewayKey,
		"--fleetup-rate", strconv.Itoa(unlimitedFleetUp), "--fleetup-burst", strconv.Itoa(unlimitedFleetUp))
	if err != nil {
		return nil, err
	}
	defer gw.p.Stop()

	credConn, err := e.dial(creds.addr)
	if err != nil {
		return nil, err
	}
	gwConn, err := e.dial(gw.addr)
	if err != nil {
		return nil, err
	}
	m, err := newSoakMix(ctx, e, so, sim, credConn, gwConn, files.adminKey)
	if err != nil {
		return nil, err
	}
	rep.Mix = m.shares()

	// The peak: closed loop at each probed caller count.
	for _, c := range so.ProbeCallers {
		r := RunLoad(ctx, Load{Workers: c, Warmup: so.ProbeDuration / 5, Duration: so.ProbeDuration}, m.op)
		opts.progress(fmt.Sprintf("soak: peak probe %3d callers  %8.0f calls/s  p99 %7.3f ms  errors %d", c, r.Throughput, r.P99ms, r.Errors))
		rep.Peak = append(rep.Peak, r)
		if r.Errors > 0 {
			return rep, fmt.Errorf("soak: %d errors while probing the peak: %s", r.Errors, r.FirstError)
		}
		rep.PeakRPS = max(rep.PeakRPS, r.Throughput)
	}
	if rep.PeakRPS <= 0 {
		return rep, errors.New("soak: no throughput at any probed caller count")
	}
	rep.TargetRPS = so.Share * rep.PeakRPS
	m.resetCounts()

	opts.progress(fmt.Sprintf("soak: %s at %.0f calls/s (%.0f %% of %.0f), sampling every %s", so.Duration, rep.TargetRPS, 100*so.Share, rep.PeakRPS, so.Interval))
	sampleCtx, stopSampling := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { rep.Samples = sampleSoak(sampleCtx, opts, []*soakProc{creds, gw}, so.Interval) })
	workers := 2 * slices.Max(so.ProbeCallers)
	rep.Result = RunLoad(ctx, Load{Workers: workers, Duration: so.Duration, Rate: rep.TargetRPS,
		MaxOps: int64(rep.TargetRPS*so.Duration.Seconds()*1.1) + 1}, m.op)
	stopSampling()
	wg.Wait()
	rep.Calls = m.counts()
	for _, p := range []*soakProc{creds, gw} {
		if p.p.Exited() {
			return rep, fmt.Errorf("soak: %s exited during the soak; its output:\n%s", p.name, p.p.Log)
		}
	}
	rep.Growth = soakGrowth(rep.Samples)
	opts.progress(fmt.Sprintf("soak: %d calls at %.0f/s, %d errors, p50 %.3f ms, p99 %.3f ms", rep.Result.Ops, rep.Result.Throughput, rep.Result.Errors, rep.Result.P50ms, rep.Result.P99ms))
	return rep, ctx.Err()
}

// soakFiles are what both processes are started with.
type soakFiles struct {
	policy, handleKeys   string
	adminKey, gatewayKey string
}

// writeSoakFiles writes a handle key file and a policy naming two API
// keys: the bench's (every credentials action on every tenant) and the
// gateway's (sessions.resolve).
func writeSoakFiles(dir string) (soakFiles, error) {
	f := soakFiles{adminKey: "bench-admin-" + randomHex(16), gatewayKey: "bench-gateway-" + randomHex(16),
		policy: filepath.Join(dir, "policy.yaml"), handleKeys: filepath.Join(dir, "handle-keys")}
	hash := func(k string) string { s := sha256.Sum256([]byte(k)); return hex.EncodeToString(s[:]) }
	policy := fmt.Sprintf(`api_keys:
  - principal: key:bench
    sha256: %q
  - principal: key:gateway
    sha256: %q
grants:
  - principals: ["key:bench"]
    tenants: ["*"]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
    scopes: [read, raw]
  - principals: ["key:gateway"]
    tenants: ["*"]
    actions: [sessions.resolve]
`, hash(f.adminKey), hash(f.gatewayKey))
	if err := os.WriteFile(f.policy, []byte(policy), 0o600); err != nil {
		return f, err
	}
	key, err := hex.DecodeString(randomHex(32))
	if err != nil {
		return f, err
	}
	return f, os.WriteFile(f.handleKeys, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600)
}

// startSoakProc runs `fleetbroker <service>` on loopback with the
// production defaults (logs at warn, as the memory phase) and waits until
// it reports SERVING.
func startSoakProc(ctx context.Context, e *env, bin, service string, files soakFiles, apiKey string, extra ...string) (*soakProc, error) {
	addr, err := loopbackAddr()
	if err != nil {
		return nil, err
	}
	metricsAddr, err := loopbackAddr()
	if err != nil {
		return nil, err
	}
	args := append([]string{service, "--listen", addr, "--insecure", "--reflection=false",
		"--vault-addr", e.vault.Addr, "--redis-addr", e.redis.Addr, "--redis-prefix", soakPrefix,
		"--allowed-upstreams", e.allowed, "--handle-key-file", files.handleKeys,
		"--metrics-listen", metricsAddr, "--log-level", "warn"}, extra...)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "FLEETBROKER_VAULT_TOKEN="+e.vault.Token)
	if apiKey != "" {
		cmd.Env = append(cmd.Env, "FLEETBROKER_CREDENTIALS_API_KEY="+apiKey)
	}
	p, err := startProc("fleetbroker "+service, cmd, "")
	if err != nil {
		return nil, err
	}
	sp := &soakProc{name: service, addr: addr, metricsAddr: metricsAddr, p: p}
	conn, err := e.dial(addr)
	if err != nil {
		p.Stop()
		return nil, err
	}
	health := grpc_health_v1.NewHealthClient(conn)
	if err := p.WaitReady(60*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		resp, err := health.Check(cctx, &grpc_health_v1.HealthCheckRequest{})
		if err == nil && resp.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING {
			err = fmt.Errorf("health: %s", resp.GetStatus())
		}
		return err
	}); err != nil {
		p.Stop()
		return nil, err
	}
	return sp, nil
}

func loopbackAddr() (string, error) {
	port, err := freePort()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), nil
}

// soakMix is the soak's load: mostly gateway reads with a pool of handles
// over Wialon and FleetUp accounts, position streams opened and closed,
// sessions issued and revoked, and credentials rotated (replaced).
type soakMix struct {
	creds      credentialsv1.CredentialServiceClient
	sessions   credentialsv1.SessionServiceClient
	telematics telematicsv1.TelematicsServiceClient
	admin      metadata.MD
	handles    []metadata.MD
	rotate     []account
	baseURL    string
	seq        atomic.Int64
	mu         sync.Mutex
	calls      map[string]int64
}

// The mix, per 100 calls.
var soakOps = []struct {
	name string
	per  int
}{
	{"GetLatestPositions", 80},
	{"ListUnits", 10},
	{"IssueSession+RevokeSession", 5},
	{"PutCredential (rotation)", 3},
	{"WatchPositions (first message)", 2},
}

func newSoakMix(ctx context.Context, e *env, so SoakOptions, sim *simHTTP, credConn, gwConn *grpc.ClientConn, adminKey string) (*soakMix, error) {
	m := &soakMix{
		creds:      credentialsv1.NewCredentialServiceClient(credConn),
		sessions:   credentialsv1.NewSessionServiceClient(credConn),
		telematics: telematicsv1.NewTelematicsServiceClient(gwConn),
		admin:      metadata.Pairs("x-api-key", adminKey),
		baseURL:    sim.url,
		calls:      map[string]int64{},
	}
	actx := metadata.NewOutgoingContext(ctx, m.admin)
	for i := range max(so.Accounts, 2) {
		a := newAccount(sim.sim, providers[i%2], "soak", i)
		if err := m.put(actx, a); err != nil {
			return nil, err
		}
		for range 5 {
			resp, err := m.sessions.IssueSession(actx, &credentialsv1.IssueSessionRequest{TenantId: soakTenant, CredentialId: a.credID, Ttl: durationpb.New(time.Hour)})
			if err != nil {
				return nil, fmt.Errorf("soak: issue a handle: %w", err)
			}
			m.handles = append(m.handles, metadata.Pairs("authorization", "Bearer "+resp.GetHandle()))
		}
	}
	// Rotated credentials are apart from the read ones, so a rotation
	// (which retires the account's upstream session) never slows a read.
	for i := range 4 {
		a := newAccount(sim.sim, provWialon, "srot", i)
		if err := m.put(actx, a); err != nil {
			return nil, err
		}
		m.rotate = append(m.rotate, a)
	}
	return m, nil
}

func (m *soakMix) put(ctx context.Context, a account) error {
	req := &credentialsv1.PutCredentialRequest{TenantId: soakTenant, CredentialId: a.credID, SkipValidation: true}
	if a.provider == provWialon {
		req.Secret = &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: a.token, BaseUrl: m.baseURL}}
	} else {
		req.Secret = &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
			ApiKey: a.apiKey, AccountId: a.acctID, Secret: a.secret, BaseUrl: m.baseURL}}
	}
	if _, err := m.creds.PutCredential(ctx, req); err != nil {
		return fmt.Errorf("soak: put credential %s: %w", a.credID, err)
	}
	return nil
}

func (m *soakMix) shares() map[string]float64 {
	out := map[string]float64{}
	for _, o := range soakOps {
		out[o.name] = float64(o.per) / 100
	}
	return out
}

func (m *soakMix) op(ctx context.Context, _ int) error {
	n := m.seq.Add(1)
	slot := int(n % 100)
	name := soakOps[len(soakOps)-1].name
	for _, o := range soakOps {
		if slot < o.per {
			name = o.name
			break
		}
		slot -= o.per
	}
	m.mu.Lock()
	m.calls[name]++
	m.mu.Unlock()
	h := m.handles[int(n)%len(m.handles)]
	gctx := metadata.NewOutgoingContext(ctx, h)
	actx := metadata.NewOutgoingContext(ctx, m.admin)
	switch name {
	case "GetLatestPositions":
		_, err := m.telematics.GetLatestPositions(gctx, &telematicsv1.GetLatestPositionsRequest{})
		return err
	case "ListUnits":
		_, err := m.telematics.ListUnits(gctx, &telematicsv1.ListUnitsRequest{})
		return err
	case "IssueSession+RevokeSession":
		resp, err := m.sessions.IssueSession(actx, &credentialsv1.IssueSessionRequest{TenantId: soakTenant, CredentialId: m.rotate[0].credID, Ttl: durationpb.New(time.Minute)})
		if err != nil {
			return err
		}
		_, err = m.sessions.RevokeSession(actx, &credentialsv1.RevokeSessionRequest{Handle: resp.GetHandle()})
		return err
	case "PutCredential (rotation)":
		a := m.rotate[int(n)%len(m.rotate)]
		a.token = fmt.Sprintf("%s%016d", a.token[:56], n) // a new secret, 72 characters
		return m.put(actx, a)
	default:
		return m.watchOnce(gctx)
	}
}

// watchOnce opens a position stream, waits for its first message and
// closes it, as a caller that goes away does.
func (m *soakMix) watchOnce(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := m.telematics.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{})
	if err != nil {
		return err
	}
	_, err = stream.Recv()
	return err
}

func (m *soakMix) resetCounts() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = map[string]int64{}
}

func (m *soakMix) counts() map[string]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int64, len(m.calls))
	for k, v := range m.calls {
		out[k] = v
	}
	return out
}

// sampleSoak reads every process each interval until ctx is done.
func sampleSoak(ctx context.Context, opts Options, procs []*soakProc, interval time.Duration) []SoakSample {
	var out []SoakSample
	start := time.Now()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		for _, p := range procs {
			s := SoakSample{ElapsedS: time.Since(start).Seconds(), Process: p.name}
			if rss, _, err := readRSS(p.p.Pid()); err == nil {
				s.RSSMiB = mib(rss)
			}
			if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.p.Pid())); err == nil {
				s.FDs = len(fds)
			}
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			s.Goroutines, _ = scrapeGoroutines(sctx, p.metricsAddr)
			cancel()
			out = append(out, s)
			opts.progress(fmt.Sprintf("soak: %6.1fs %-11s RSS %6.1f MiB  goroutines %5d  open FDs %4d", s.ElapsedS, p.name, s.RSSMiB, s.Goroutines, s.FDs))
		}
		select {
		case <-ctx.Done():
			return out
		case <-t.C:
		}
	}
}

// scrapeGoroutines reads go_goroutines from a process's metrics listener.
func scrapeGoroutines(ctx context.Context, metricsAddr string) (int, error) {
	g, err := launch.ScrapeMetric(ctx, metricsAddr, "go_goroutines")
	return int(g), err
}

// soakGrowth compares, per process and measure, the floor (minimum) of
// the samples right after the warm-up (the first tenth of the run) with
// the floor of the last ones: a leak raises the floor, while calls in
// flight and garbage not yet collected only raise single samples.
func soakGrowth(samples []SoakSample) []SoakGrowth {
	byProc := map[string][]SoakSample{}
	var names []string
	for _, s := range samples {
		if _, ok := byProc[s.Process]; !ok {
			names = append(names, s.Process)
		}
		byProc[s.Process] = append(byProc[s.Process], s)
	}
	var out []SoakGrowth
	for _, name := range names {
		ss := byProc[name]
		window := max(len(ss)/10, soakWindow)
		ss = ss[len(ss)/10:]
		if len(ss) < 2*window {
			continue // too short a run to tell
		}
		for _, f := range soakFlat {
			g := SoakGrowth{Process: name, Measure: f.measure, First: floorOf(ss[:window], f.of), Last: floorOf(ss[len(ss)-window:], f.of)}
			g.Limit = g.First*(1+f.share) + f.allowance
			g.Flat = g.Last <= g.Limit
			out = append(out, g)
		}
	}
	return out
}

func floorOf(ss []SoakSample, of func(SoakSample) float64) float64 {
	low := of(ss[0])
	for _, s := range ss[1:] {
		low = min(low, of(s))
	}
	return low
}

// soakTargets are the soak's targets: no errors, and every measure flat.
func soakTargets(s *SoakReport) []Target {
	if s == nil {
		return nil
	}
	out := []Target{{Name: fmt.Sprintf("soak %.0fs at %.0f calls/s: errors", s.Result.ElapsedS, s.TargetRPS),
		Want: "0", Got: strconv.FormatInt(s.Result.Errors, 10), Met: s.Result.Errors == 0}}
	for _, g := range s.Growth {
		out = append(out, Target{Name: fmt.Sprintf("soak %s %s flat", g.Process, g.Measure),
			Want: fmt.Sprintf("≤ %.1f", g.Limit), Got: fmt.Sprintf("%.1f → %.1f", g.First, g.Last), Met: g.Flat})
	}
	return out
}

// writeSoakText prints the soak phase for people.
func writeSoakText(out io.Writer, s *SoakReport) {
	if s == nil {
		return
	}
	fmt.Fprintf(out, "6. Soak: `fleetbroker credentials` + `fleetbroker gateway`, mix %s\n", formatMix(s.Mix))
	fmt.Fprintf(out, "peak %.0f calls/s (closed loop, best of %d probes); soak at %.0f calls/s for %.0fs: %d calls, %d errors, p50 %.3f ms, p99 %.3f ms\n",
		s.PeakRPS, len(s.Peak), s.TargetRPS, s.Result.ElapsedS, s.Result.Ops, s.Result.Errors, s.Result.P50ms, s.Result.P99ms)
	for _, g := range s.Growth {
		fmt.Fprintf(out, "  %-12s %-11s %8.1f → %8.1f (flat up to %.1f)\n", g.Process, g.Measure, g.First, g.Last, g.Limit)
	}
	fmt.Fprintln(out)
}

func formatMix(mix map[string]float64) string {
	var parts []string
	for _, o := range soakOps {
		parts = append(parts, fmt.Sprintf("%.0f%% %s", 100*mix[o.name], o.name))
	}
	return strings.Join(parts, ", ")
}
