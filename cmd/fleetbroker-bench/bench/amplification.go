package bench

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/metadata"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

const ampTenant = "bench-amp"

// AmpRow is one account under N callers: through the gateway (on 1 or 3
// replicas) or naive (every caller logs in by itself).
type AmpRow struct {
	Provider string `json:"provider"`
	Client   string `json:"client"` // "gateway" or "naive"
	// Level is the gateway's security level (production.go): plain, or
	// production.
	Level     string `json:"level,omitempty"`
	Instances int    `json:"gateway_instances,omitempty"`
	Callers   int    `json:"callers"`
	Calls     int64  `json:"calls"`
	Errors    int64  `json:"errors"`
	FirstErr  string `json:"first_error,omitempty"`
	// Logins are FleetUp mints (POST /token) or Wialon logins (token/login)
	// the simulator counted for this row's account during the run.
	Logins int64 `json:"logins"`
	// Lifetimes is how many token lifetimes the run spans: ceil(run /
	// lifetime), lifetime being the JWT's for FleetUp and the shared
	// session's reuse bound for Wialon.
	Lifetimes   int     `json:"lifetimes"`
	PerLifetime float64 `json:"logins_per_account_per_lifetime"`
}

// AmpReport is the upstream amplification phase.
type AmpReport struct {
	JWTLifetimeS     float64  `json:"jwt_lifetime_s"`
	JWTSafetyMarginS float64  `json:"jwt_safety_margin_s"`
	RunS             float64  `json:"run_s"`
	CallIntervalS    float64  `json:"call_interval_s"`
	Rows             []AmpRow `json:"rows"`
}

// ampJob is one row's callers.
type ampJob struct {
	row   *AmpRow
	acct  account
	call  func(ctx context.Context, caller int) error // one caller's request
	calls atomic.Int64
	errs  atomic.Int64
	first atomic.Value
}

// runAmplification runs, per gateway replica count, every caller count
// against its own account at once; then the naive clients the same way. Each run lasts opts.AmpDuration over a simulator whose JWTs live
// opts.AmpLifetime. All callers of a row send their first request at the
// same instant (a cold-cache stampede), then one request per AmpInterval,
// spread evenly.
func runAmplification(ctx context.Context, e *env, opts Options, sim *simHTTP) (*AmpReport, error) {
	margin := opts.AmpLifetime / 30 // production's 2 min of a 60 min JWT
	rep := &AmpReport{JWTLifetimeS: opts.AmpLifetime.Seconds(), JWTSafetyMarginS: margin.Seconds(),
		RunS: opts.AmpDuration.Seconds(), CallIntervalS: opts.AmpInterval.Seconds()}
	naiveW, naiveF := wialon.New(upstreamClient(e.opts.BaselineIdlePerHost)), fleetup.New(upstreamClient(e.opts.BaselineIdlePerHost))
	// One run per gateway replica count, plain and then production, then
	// one for the naive clients, so no run shares the machine with another's
	// stampede.
	type ampRun struct {
		level     string
		instances int // 0: the naive clients
	}
	var runs []ampRun
	for _, level := range []string{lvlPlain, lvlProduction} {
		if level == lvlProduction && !slices.Contains(opts.levels(), lvlProduction) {
			continue
		}
		for _, n := range opts.AmpInstances {
			runs = append(runs, ampRun{level, n})
		}
	}
	runs = append(runs, ampRun{})
	for gi, run := range runs {
		var jobs []*ampJob
		naive := run.instances == 0
		var gws []telematicsv1.TelematicsServiceClient
		if !naive {
			gws = make([]telematicsv1.TelematicsServiceClient, run.instances)
			for i := range gws {
				gw, err := e.startGatewayAt(ctx, run.level, gatewayOpts{prefix: fmt.Sprintf("fbbench-amp%d", gi), jwtSafetyMargin: margin})
				if err != nil {
					return nil, err
				}
				gws[i] = gw
			}
		}
		for ni, n := range opts.AmpCallers {
			for _, p := range providers {
				if naive {
					a := newAccount(sim.sim, p, fmt.Sprintf("n%03d", ni), 0)
					jobs = append(jobs, &ampJob{row: &AmpRow{Provider: p, Client: "naive", Callers: n}, acct: a,
						call: naiveCaller(n, naiveW, naiveF, sim.url, a)})
					continue
				}
				j, err := e.gatewayAmpJob(ctx, sim, gws, p, fmt.Sprintf("g%d%02d", gi, ni), n)
				if err != nil {
					return nil, err
				}
				j.row.Level = run.level
				jobs = append(jobs, j)
			}
		}
		what := "naive clients"
		if !naive {
			what = fmt.Sprintf("%d gateway instance(s) at level %s", len(gws), run.level)
		}
		e.opts.progress(fmt.Sprintf("amplification: %s, callers %v, %s run, JWT lifetime %s", what, opts.AmpCallers, opts.AmpDuration, opts.AmpLifetime))
		before := sim.sim.Stats()
		runAmpJobs(ctx, opts, jobs)
		after := sim.sim.Stats()
		for _, j := range jobs {
			r := j.row
			r.Calls, r.Errors = j.calls.Load(), j.errs.Load()
			if s, ok := j.first.Load().(string); ok {
				r.FirstErr = s
			}
			lifetime := opts.AmpLifetime
			if r.Provider == provWialon {
				fp := simulator.Fingerprint(j.acct.token)
				r.Logins = after.WialonLoginsByToken[fp] - before.WialonLoginsByToken[fp]
				lifetime = gateway.DefaultWialonSessionTTL
			} else {
				r.Logins = after.FleetUpMintsByAccount[j.acct.acctID] - before.FleetUpMintsByAccount[j.acct.acctID]
			}
			r.Lifetimes = int(math.Ceil(opts.AmpDuration.Seconds() / lifetime.Seconds()))
			r.PerLifetime = float64(r.Logins) / float64(r.Lifetimes)
			e.opts.progress(fmt.Sprintf("  %-7s %-14s  callers %4d  calls %6d  errors %d  logins %d  per lifetime %.2f",
				r.Provider, clientLabel(*r), r.Callers, r.Calls, r.Errors, r.Logins, r.PerLifetime))
			rep.Rows = append(rep.Rows, *r)
		}
	}
	return rep, nil
}

// gatewayAmpJob stores a fresh account as a credential and gives each of
// n callers a handle of its own, spread over the gateway replicas.
func (e *env) gatewayAmpJob(ctx context.Context, sim *simHTTP, gws []telematicsv1.TelematicsServiceClient, provider, tag string, n int) (*ampJob, error) {
	a := newAccount(sim.sim, provider, tag, 0)
	if err := e.put(ctx, ampTenant, a, sim.url); err != nil {
		return nil, err
	}
	handles := make([]metadata.MD, n)
	if err := parallel(ctx, n, 16, func(ctx context.Context, i int) (err error) {
		handles[i], err = e.issue(ctx, ampTenant, a.credID)
		return err
	}); err != nil {
		return nil, err
	}
	return &ampJob{row: &AmpRow{Provider: provider, Client: "gateway", Instances: len(gws), Callers: n}, acct: a,
		call: func(ctx context.Context, i int) error {
			_, err := gws[i%len(gws)].GetLatestPositions(metadata.NewOutgoingContext(ctx, handles[i]), &telematicsv1.GetLatestPositionsRequest{})
			return err
		}}, nil
}

// runAmpJobs starts every caller of every job at the same instant and
// returns when the run is over.
func runAmpJobs(ctx context.Context, opts Options, jobs []*ampJob) {
	start := time.Now().Add(200 * time.Millisecond) // let every goroutine reach the start line
	end := start.Add(opts.AmpDuration)
	var wg sync.WaitGroup
	for _, j := range jobs {
		n := j.row.Callers
		for i := range n {
			wg.Go(func() {
				// Request k of caller i is due at start + k·interval + i/n·interval:
				// all together first, then evenly spread. At most run/interval+1.
				for k := 0; ctx.Err() == nil; k++ {
					at := start.Add(time.Duration(k) * opts.AmpInterval)
					if k > 0 {
						at = at.Add(opts.AmpInterval * time.Duration(i) / time.Duration(n))
					}
					if !at.Before(end) || !sleepCtx(ctx, time.Until(at)) {
						return
					}
					cctx, cancel := context.WithTimeout(ctx, opTimeout)
					err := j.call(cctx, i)
					cancel()
					j.calls.Add(1)
					if err != nil {
						j.errs.Add(1)
						j.first.CompareAndSwap(nil, err.Error())
					}
				}
			})
		}
	}
	wg.Wait()
}

// naiveCaller returns the calls of n naive clients of one account: each
// logs in (Wialon) or mints a JWT (FleetUp) for itself, keeps it, and logs
// in again only when the provider says the session is gone.
func naiveCaller(n int, wc *wialon.Client, fc *fleetup.Client, baseURL string, a account) func(context.Context, int) error {
	tokens := make([]string, n) // caller i's sid or JWT; only caller i touches index i
	login := func(ctx context.Context, i int) error {
		var err error
		if a.provider == provWialon {
			var s wialon.Session
			s, err = wc.Login(ctx, baseURL, a.token)
			tokens[i] = s.SID
		} else {
			var t fleetup.Token
			t, err = fc.MintToken(ctx, baseURL, a.apiKey, a.acctID, a.secret)
			tokens[i] = t.JWT
		}
		return err
	}
	read := func(ctx context.Context, i int) error {
		if a.provider == provWialon {
			_, err := wc.SearchUnits(ctx, baseURL, tokens[i])
			return err
		}
		_, err := fc.LastLocations(ctx, fleetup.Auth{BaseURL: baseURL, APIKey: a.apiKey, JWT: tokens[i], AccountID: a.acctID}, nil)
		return err
	}
	return func(ctx context.Context, i int) error {
		if tokens[i] == "" {
			if err := login(ctx, i); err != nil {
				return err
			}
		}
		err := read(ctx, i)
		if upstream.KindOf(err) == upstream.KindSessionInvalid {
			if err := login(ctx, i); err != nil {
				return err
			}
			err = read(ctx, i)
		}
		return err
	}
}

// clientLabel names a row's client for progress lines: "gateway×3" or "naive".
func clientLabel(r AmpRow) string {
	if r.Client == "gateway" {
		if r.Level != "" && r.Level != lvlPlain {
			return fmt.Sprintf("gateway×%d %s", r.Instances, r.Level)
		}
		return fmt.Sprintf("gateway×%d", r.Instances)
	}
	return r.Client
}
