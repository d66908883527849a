package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

// MemoryReport is the gateway's resident memory with many live handles and
// cached accounts. It is the VmRSS of a real `fleetbroker gateway` process
// (production wiring, built from this tree), read from /proc/<pid>/status.
type MemoryReport struct {
	// Level is the gateway's security level: plain (plaintext, no caller
	// authentication) or production (mTLS, policy, rate limits, audit file).
	Level    string `json:"level"`
	Binary   string `json:"binary"`
	Handles  int    `json:"handles"`
	Accounts int    `json:"accounts"`
	Tenants  int    `json:"tenants"`
	// IdleRSSMiB is after start, before any call.
	IdleRSSMiB float64 `json:"idle_rss_mib"`
	// LoadedRSSMiB is right after the last pass over every handle.
	LoadedRSSMiB float64 `json:"loaded_rss_mib"`
	MaxRSSMiB    float64 `json:"max_rss_mib"`
	HWMMiB       float64 `json:"vm_hwm_mib"`
	// PassSeconds is how long each pass over all handles took; a pass
	// shorter than the handle cache TTL (5 s) keeps every resolution live.
	PassSeconds []float64 `json:"pass_seconds"`
	Calls       int64     `json:"calls"`
	Errors      int64     `json:"errors"`
	FirstError  string    `json:"first_error,omitempty"`
	// PerHandleKiB is (loaded − idle) / handles: an upper bound, since it
	// also holds the accounts' state and heap not yet returned to the OS.
	PerHandleKiB float64 `json:"per_handle_kib_upper_bound"`
}

// maxMemPasses bounds the keep-warm loop.
const maxMemPasses = 50

// runMemory measures the real gateway binary at the plain level and, unless
// the run skips the production variants, at the production level.
func runMemory(ctx context.Context, e *env, opts Options, sim *simHTTP) (plain, production *MemoryReport, err error) {
	if e.vault == nil {
		return nil, nil, errors.New("the memory phase runs the real `fleetbroker gateway`, which needs Vault (not -no-vault)")
	}
	bin := opts.FleetbrokerBin
	if bin == "" {
		dir, err := os.MkdirTemp("", "fleetbroker-bench-bin-")
		if err != nil {
			return nil, nil, err
		}
		defer os.RemoveAll(dir)
		opts.progress("memory: go build ./cmd/fleetbroker")
		if bin, err = buildFleetbroker(ctx, dir); err != nil {
			return nil, nil, err
		}
	}
	if plain, err = measureMemory(ctx, e, opts, sim, bin, lvlPlain); err != nil {
		return nil, nil, err
	}
	if slices.Contains(opts.levels(), lvlProduction) {
		if production, err = measureMemory(ctx, e, opts, sim, bin, lvlProduction); err != nil {
			return plain, nil, err
		}
	}
	return plain, production, nil
}

// gatewayArgs are the command line of `fleetbroker gateway` at level,
// listening on addr.
func (e *env) gatewayArgs(ctx context.Context, level, addr string) ([]string, error) {
	args := []string{"gateway", "--listen", addr, "--reflection=false",
		"--vault-addr", e.vault.Addr, "--vault-transit-key", gatewayKey,
		"--redis-addr", e.redis.Addr, "--redis-prefix", "fbbench-mem-" + level,
		"--allowed-upstreams", e.allowed, "--handle-key-file", e.handleKeyFile,
		"--fleetup-rate", strconv.Itoa(unlimitedFleetUp), "--fleetup-burst", strconv.Itoa(unlimitedFleetUp),
		"--log-level", "warn"}
	if level == lvlPlain {
		return append(args, "--insecure", "--credentials-addr", e.credsAddr, "--credentials-insecure"), nil
	}
	pki, err := e.production()
	if err != nil {
		return nil, err
	}
	creds, err := e.credentialsVariant(ctx, credsVariantNamed(lvlProduction))
	if err != nil {
		return nil, err
	}
	limit := strconv.Itoa(benchRateLimit)
	return append(args, "--tls-cert", pki.gwCert, "--tls-key", pki.gwKey, "--tls-client-ca", pki.caFile,
		"--policy", e.policyFile, "--audit-log", e.auditFile("gateway-memory"),
		"--rate-limit-principal", limit, "--rate-limit-session", limit, "--rate-limit-tenant", limit,
		"--credentials-addr", creds.addr, "--credentials-ca", pki.caFile, "--credentials-cert", pki.gwCert,
		"--credentials-key", pki.gwKey, "--credentials-server-name", "localhost"), nil
}

func measureMemory(ctx context.Context, e *env, opts Options, sim *simHTTP, bin, level string) (*MemoryReport, error) {
	rep := &MemoryReport{Level: level, Binary: bin, Handles: opts.MemHandles, Accounts: opts.MemAccounts, Tenants: max(opts.MemAccounts/10, 1)}

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	args, err := e.gatewayArgs(ctx, level, addr)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "FLEETBROKER_VAULT_TOKEN="+e.vault.Token)
	child, err := startProc("fleetbroker gateway", cmd, "")
	if err != nil {
		return nil, err
	}
	defer child.Stop()
	conn, err := e.dialAs(addr, level, false)
	if err != nil {
		return nil, err
	}
	health := grpc_health_v1.NewHealthClient(conn)
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
	time.Sleep(time.Second)
	rss, _, err := readRSS(child.Pid())
	if err != nil {
		return nil, err
	}
	rep.IdleRSSMiB = mib(rss)

	// 1,000 accounts (half Wialon, half FleetUp) in 100 tenants, 10 handles
	// each, ordered by account so concurrent calls share upstream reads as
	// real callers of one account would.
	opts.progress(fmt.Sprintf("memory (%s): %d accounts in %d tenants, %d handles", level, rep.Accounts, rep.Tenants, rep.Handles))
	perAcct := max(rep.Handles/rep.Accounts, 1)
	handles := make([]metadata.MD, rep.Accounts*perAcct)
	if err := parallel(ctx, rep.Accounts, 16, func(ctx context.Context, i int) error {
		a := newAccount(sim.sim, providers[i%2], map[string]string{lvlPlain: "memo", lvlProduction: "memx"}[level], i)
		tenant := fmt.Sprintf("bench-mem-%s-%03d", level, i%rep.Tenants)
		if err := e.put(ctx, tenant, a, sim.url); err != nil {
			return err
		}
		for k := range perAcct {
			md, err := e.issue(ctx, tenant, a.credID)
			if err != nil {
				return err
			}
			handles[i*perAcct+k] = md
		}
		return nil
	}); err != nil {
		return nil, err
	}

	gw := telematicsv1.NewTelematicsServiceClient(conn)
	req := &telematicsv1.GetLatestPositionsRequest{UnitIds: []string{"10001"}}
	var calls, errs atomic.Int64
	var first atomic.Value
	holdUntil := time.Now().Add(opts.MemHold)
	for pass := 0; pass < maxMemPasses && ctx.Err() == nil; pass++ {
		start := time.Now()
		_ = parallel(ctx, len(handles), 64, func(ctx context.Context, i int) error {
			cctx, cancel := context.WithTimeout(ctx, opTimeout)
			defer cancel()
			_, err := gw.GetLatestPositions(metadata.NewOutgoingContext(cctx, handles[i]), req)
			calls.Add(1)
			if err != nil {
				errs.Add(1)
				first.CompareAndSwap(nil, err.Error())
			}
			return nil
		})
		rep.PassSeconds = append(rep.PassSeconds, time.Since(start).Seconds())
		rss, hwm, err := readRSS(child.Pid())
		if err != nil {
			return nil, err
		}
		rep.LoadedRSSMiB, rep.HWMMiB = mib(rss), mib(hwm)
		rep.MaxRSSMiB = max(rep.MaxRSSMiB, rep.LoadedRSSMiB)
		opts.progress(fmt.Sprintf("memory (%s): pass %d over %d handles in %.2fs, RSS %.1f MiB", level, pass+1, len(handles), time.Since(start).Seconds(), rep.LoadedRSSMiB))
		if time.Now().After(holdUntil) && pass > 0 {
			break
		}
	}
	rep.Calls, rep.Errors = calls.Load(), errs.Load()
	if s, ok := first.Load().(string); ok {
		rep.FirstError = s
	}
	rep.PerHandleKiB = (rep.LoadedRSSMiB - rep.IdleRSSMiB) * 1024 / float64(len(handles))
	if last := rep.PassSeconds[len(rep.PassSeconds)-1]; last > gateway.DefaultHandleCacheTTL.Seconds() {
		opts.progress(fmt.Sprintf("memory: WARNING the last pass took %.1fs, longer than the %s handle cache: not every handle was live at once", last, gateway.DefaultHandleCacheTTL))
	}
	return rep, nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// buildFleetbroker builds ./cmd/fleetbroker of the module the bench runs
// in, into dir.
func buildFleetbroker(ctx context.Context, dir string) (string, error) {
	root, err := launch.ModuleRoot()
	if err != nil {
		return "", fmt.Errorf("%w: run the bench from the repository, or pass -fleetbroker-bin", err)
	}
	out := filepath.Join(dir, "fleetbroker")
	if err := launch.GoBuild(ctx, root, "./cmd/fleetbroker", out); err != nil {
		return "", err
	}
	return out, nil
}
