package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

// StreamsReport is what open WatchPositions streams cost one gateway: the
// VmRSS and goroutines of a real `fleetbroker gateway` process (plain
// level) before and with Streams streams open, and the upstream polls they
// cause.
type StreamsReport struct {
	Binary string `json:"binary"`
	// Streams is how many streams were open at once, over Connections
	// client connections, Handles session handles, Accounts credentials
	// and Tenants tenants: spread so that the gateway's default limits
	// (16 per handle, 1,000 per tenant, 1,000 per connection) hold.
	Streams     int `json:"streams"`
	Connections int `json:"connections"`
	Handles     int `json:"handles"`
	Accounts    int `json:"accounts"`
	Tenants     int `json:"tenants"`
	// IntervalS is the min_interval every stream asked for.
	IntervalS float64 `json:"interval_s"`
	// Before is with every handle resolved and every account's upstream
	// session cached (a call through each handle), no stream open; With
	// is with every stream open and past its first message.
	Before footprint `json:"before"`
	With   footprint `json:"with"`
	HWMMiB float64   `json:"vm_hwm_mib"`
	// PerStreamKiB is (With − Before) RSS / Streams; GoroutinesPerStream
	// likewise.
	PerStreamKiB        float64 `json:"per_stream_kib"`
	HeapPerStreamKiB    float64 `json:"heap_per_stream_kib"`
	StackPerStreamKiB   float64 `json:"stack_per_stream_kib"`
	GoroutinesPerStream float64 `json:"goroutines_per_stream"`
	// OpenSeconds is how long opening every stream (to its first message)
	// took.
	OpenSeconds float64 `json:"open_seconds"`
	// PollsPerAccountPerInterval is the upstream requests (the simulator's
	// count) per account per interval while every stream was open: 1 when
	// all of an account's streams share one poll.
	PollsPerAccountPerInterval float64 `json:"polls_per_account_per_interval"`
	// Messages is how many stream messages arrived; Errors how many
	// streams failed, and the first error.
	Messages   int64  `json:"messages"`
	Errors     int64  `json:"errors"`
	FirstError string `json:"first_error,omitempty"`
}

// Shape of the streams phase.
const (
	streamsPerHandle = gateway.DefaultMaxStreamsPerHandle // the default limit
	streamsPerConn   = 800                                // under the default 1,000 per connection
	streamsPerTenant = 800                                // under the default 1,000 per tenant
	handlesPerAcct   = 10
	streamInterval   = 2 * time.Second
	// streamWindow is how long every stream stays open while the polls are
	// counted.
	streamWindow = 3 * streamInterval
)

// runStreams opens opts.Streams WatchPositions streams on one real
// gateway and measures what they cost.
func runStreams(ctx context.Context, e *env, opts Options, sim *simHTTP) (*StreamsReport, error) {
	if e.vault == nil {
		return nil, errors.New("the streams phase runs the real `fleetbroker gateway`, which needs Vault (not -no-vault)")
	}
	bin := opts.FleetbrokerBin
	if bin == "" {
		dir, err := os.MkdirTemp("", "fleetbroker-bench-bin-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		opts.progress("streams: go build ./cmd/fleetbroker")
		if bin, err = buildFleetbroker(ctx, dir); err != nil {
			return nil, err
		}
	}
	n := max(opts.Streams, 1)
	handles := (n + streamsPerHandle - 1) / streamsPerHandle
	accounts := (handles + handlesPerAcct - 1) / handlesPerAcct
	tenants := (n + streamsPerTenant - 1) / streamsPerTenant
	rep := &StreamsReport{Binary: bin, Streams: n, Connections: (n + streamsPerConn - 1) / streamsPerConn,
		Handles: handles, Accounts: accounts, Tenants: tenants, IntervalS: streamInterval.Seconds()}

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	metricsPort, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	metricsAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(metricsPort))
	args, err := e.gatewayArgs(ctx, lvlPlain, addr)
	if err != nil {
		return nil, err
	}
	args = append(args, "--redis-prefix", "fbbench-streams", "--metrics-listen", metricsAddr)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "FLEETBROKER_VAULT_TOKEN="+e.vault.Token)
	child, err := startProc("fleetbroker gateway", cmd, "")
	if err != nil {
		return nil, err
	}
	defer child.Stop()
	conns := make([]*grpc.ClientConn, rep.Connections)
	for i := range conns {
		if conns[i], err = e.dial(addr); err != nil {
			return nil, err
		}
	}
	health := grpc_health_v1.NewHealthClient(conns[0])
	if err := child.WaitReady(30*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		resp, err := health.Check(cctx, &grpc_health_v1.HealthCheckRequest{})
		if err == nil && resp.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING {
			err = fmt.Errorf("health: %s", resp.GetStatus())
		}
		return err
	}); err != nil {
		return nil, err
	}

	opts.progress(fmt.Sprintf("streams: %d accounts in %d tenants, %d handles", accounts, tenants, handles))
	mds := make([]metadata.MD, handles)
	provs := make([]string, accounts)
	if err := parallel(ctx, accounts, 16, func(ctx context.Context, i int) error {
		provs[i] = providers[i%2]
		a := newAccount(sim.sim, provs[i], "strm", i)
		tenant := fmt.Sprintf("bench-streams-%03d", i*tenants/accounts)
		if err := e.put(ctx, tenant, a, sim.url); err != nil {
			return err
		}
		for k := range handlesPerAcct {
			if h := i*handlesPerAcct + k; h < handles {
				md, err := e.issue(ctx, tenant, a.credID)
				if err != nil {
					return err
				}
				mds[h] = md
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	// Before: every handle resolved, every account's upstream session
	// cached, as when the streams arrive.
	gw := telematicsv1.NewTelematicsServiceClient(conns[0])
	if err := parallel(ctx, handles, 32, func(ctx context.Context, i int) error {
		cctx, cancel := context.WithTimeout(ctx, opTimeout)
		defer cancel()
		_, err := gw.GetLatestPositions(metadata.NewOutgoingContext(cctx, mds[i]), &telematicsv1.GetLatestPositionsRequest{})
		return err
	}); err != nil {
		return nil, fmt.Errorf("warming the handles: %w", err)
	}
	time.Sleep(time.Second)
	if rep.Before, err = gatewayFootprint(ctx, child.Pid(), metricsAddr); err != nil {
		return nil, err
	}

	// Open every stream; each counts as open once its first message came.
	opts.progress(fmt.Sprintf("streams: opening %d WatchPositions streams over %d connections", n, rep.Connections))
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	var opened, messages, failed atomic.Int64
	var firstErr atomic.Value
	allOpen := make(chan struct{})
	var openOnce sync.Once
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			c := telematicsv1.NewTelematicsServiceClient(conns[i/streamsPerConn])
			st, err := c.WatchPositions(metadata.NewOutgoingContext(sctx, mds[i/streamsPerHandle]),
				&telematicsv1.WatchPositionsRequest{MinInterval: durationpb.New(streamInterval)})
			first := true
			for err == nil {
				if _, err = st.Recv(); err == nil {
					messages.Add(1)
					if first {
						first = false
						if opened.Add(1) == int64(n) {
							openOnce.Do(func() { close(allOpen) })
						}
					}
				}
			}
			if sctx.Err() == nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				if first && opened.Add(1) == int64(n) { // counted, so the wait below ends
					openOnce.Do(func() { close(allOpen) })
				}
			}
		})
	}
	select {
	case <-allOpen:
	case <-time.After(2 * time.Minute):
		stop()
		wg.Wait()
		return nil, fmt.Errorf("only %d of %d streams had their first message after 2 minutes", opened.Load(), n)
	case <-ctx.Done():
		stop()
		wg.Wait()
		return nil, ctx.Err()
	}
	rep.OpenSeconds = time.Since(start).Seconds()
	opts.progress(fmt.Sprintf("streams: %d open in %.1fs; holding them %s", n, rep.OpenSeconds, streamWindow))
	polls0 := upstreamPolls(sim)
	time.Sleep(streamWindow)
	polls1 := upstreamPolls(sim)
	var hwm int64
	if rep.With, err = gatewayFootprint(ctx, child.Pid(), metricsAddr); err != nil {
		return nil, err
	}
	if _, hwm, err = readRSS(child.Pid()); err == nil {
		rep.HWMMiB = mib(hwm)
	}
	stop()
	wg.Wait()
	rep.Messages, rep.Errors = messages.Load(), failed.Load()
	if s, ok := firstErr.Load().(string); ok {
		rep.FirstError = s
	}
	rep.PerStreamKiB = (rep.With.RSSMiB - rep.Before.RSSMiB) * 1024 / float64(n)
	rep.HeapPerStreamKiB = (rep.With.HeapInuseMiB - rep.Before.HeapInuseMiB) * 1024 / float64(n)
	rep.StackPerStreamKiB = (rep.With.StackInuseMiB - rep.Before.StackInuseMiB) * 1024 / float64(n)
	rep.GoroutinesPerStream = float64(rep.With.Goroutines-rep.Before.Goroutines) / float64(n)
	rep.PollsPerAccountPerInterval = float64(polls1-polls0) / float64(accounts) / (streamWindow.Seconds() / streamInterval.Seconds())
	opts.progress(fmt.Sprintf("streams: RSS %.1f → %.1f MiB (%.1f KiB per stream: heap %.1f, stacks %.1f), goroutines %d → %d, %.2f polls per account per interval",
		rep.Before.RSSMiB, rep.With.RSSMiB, rep.PerStreamKiB, rep.HeapPerStreamKiB, rep.StackPerStreamKiB, rep.Before.Goroutines, rep.With.Goroutines, rep.PollsPerAccountPerInterval))
	return rep, nil
}

// upstreamPolls is how many latest-position requests the simulator served.
func upstreamPolls(sim *simHTTP) int64 {
	st := sim.sim.Stats()
	return st.Requests[upstreamEndpoint[provWialon]] + st.Requests[upstreamEndpoint[provFleetUp]]
}

// footprint is a gateway process's memory and goroutines at one moment.
type footprint struct {
	RSSMiB     float64 `json:"rss_mib"`
	Goroutines int     `json:"goroutines"`
	// HeapInuseMiB and StackInuseMiB are the Go runtime's own counts
	// (go_memstats_heap_inuse_bytes, go_memstats_stack_inuse_bytes).
	HeapInuseMiB  float64 `json:"heap_inuse_mib"`
	StackInuseMiB float64 `json:"stack_inuse_mib"`
}

// gatewayFootprint reads the gateway's VmRSS, and its goroutines and Go
// memory from its metrics at metricsAddr.
func gatewayFootprint(ctx context.Context, pid int, metricsAddr string) (footprint, error) {
	rss, _, err := readRSS(pid)
	if err != nil {
		return footprint{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+metricsAddr+"/metrics", nil)
	if err != nil {
		return footprint{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return footprint{}, fmt.Errorf("gateway metrics: %w", err)
	}
	defer resp.Body.Close()
	fp := footprint{RSSMiB: mib(rss), Goroutines: -1}
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_goroutines":
			fp.Goroutines = int(f)
		case "go_memstats_heap_inuse_bytes":
			fp.HeapInuseMiB = f / (1 << 20)
		case "go_memstats_stack_inuse_bytes":
			fp.StackInuseMiB = f / (1 << 20)
		}
	}
	if fp.Goroutines < 0 {
		return footprint{}, errors.New("gateway metrics: no go_goroutines")
	}
	return fp, nil
}
