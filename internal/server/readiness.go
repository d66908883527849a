package server

import (
	"context"
	"sync"
	"time"
)

// maxFailingInterval bounds how long a failing check waits before it runs
// again, so a dependency that comes back is announced within about a
// second whatever ReadinessInterval is (a client may itself need a moment
// to reconnect: go-redis redials a refused server once a second). Checks
// of a dependency that is down cost next to nothing.
const maxFailingInterval = 500 * time.Millisecond

// readiness runs the readiness checks and keeps health in step with them.
//
// Each check runs in its own loop, so a check that hangs until its timeout
// (a Vault behind a dead load balancer) delays no other check's verdict.
// A passing check runs every interval; a failing one every
// min(interval, maxFailingInterval). So a dependency that fails is reported
// within interval + timeout, and one that recovers within about a second.
type readiness struct {
	checks   []Check
	interval time.Duration
	retry    time.Duration
	timeout  time.Duration
	s        *Server

	mu      sync.Mutex
	results map[string]error // the last result of each check that has run
	ready   bool
}

func newReadiness(s *Server) *readiness {
	return &readiness{
		checks:   s.cfg.Readiness,
		interval: s.cfg.ReadinessInterval,
		retry:    min(s.cfg.ReadinessInterval, maxFailingInterval),
		timeout:  s.cfg.ReadinessTimeout,
		s:        s,
		results:  make(map[string]error, len(s.cfg.Readiness)),
		ready:    len(s.cfg.Readiness) == 0,
	}
}

// run runs every check until ctx is done and returns when all loops have
// stopped, so nothing changes health after it returns.
func (r *readiness) run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, c := range r.checks {
		wg.Go(func() { r.loop(ctx, c) })
	}
	wg.Wait()
}

func (r *readiness) loop(ctx context.Context, c Check) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		cctx, cancel := context.WithTimeout(ctx, r.timeout)
		err := c.Check(cctx)
		cancel()
		if ctx.Err() != nil {
			return // shutting down: the drain owns health now
		}
		r.report(c.Name, err)
		if err != nil {
			timer.Reset(r.retry)
		} else {
			timer.Reset(r.interval)
		}
	}
}

// report records one check's result and flips health when the overall
// outcome changes. A check's state changes are logged (its error included:
// checks report reachability, never secrets); steady states are not, to
// keep logs quiet.
func (r *readiness) report(name string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	log := r.s.cfg.Logger
	r.s.cfg.Metrics.SetReadiness(name, err == nil)
	prev, seen := r.results[name]
	switch {
	case err != nil && (!seen || prev == nil):
		log.Warn("readiness check failing", "check", name, "error", err)
	case err == nil && seen && prev != nil:
		log.Info("readiness check passing again", "check", name)
	}
	r.results[name] = err
	ready := len(r.results) == len(r.checks)
	for _, e := range r.results {
		ready = ready && e == nil
	}
	if ready == r.ready {
		return
	}
	r.ready = ready
	r.s.setServing(ready)
	if ready {
		log.Info("ready: health reports SERVING")
	} else {
		log.Warn("not ready: health reports NOT_SERVING")
	}
}
