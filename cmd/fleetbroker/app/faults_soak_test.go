package app_test

// The short soak: both services as real processes under mixed load for
// half a minute, sampled every second. Nothing may fail, and resident
// memory, goroutines and open file descriptors must stay flat: a leak per
// call or per stream shows within thousands of calls. The long soak (10
// minutes at about 70 % of the measured peak) is a phase of the benchmark:
// go run ./cmd/fleetbroker-bench -phases soak.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

const (
	soakWarmup   = 5 * time.Second
	soakDuration = 25 * time.Second
	soakInterval = time.Second
	// soakWindow is how many samples make the start and the end figure:
	// their floor (minimum), which a leak raises and calls in flight or
	// garbage not yet collected do not.
	soakWindow = 5
)

// Flatness bounds: the end may exceed the start by a share plus a fixed
// allowance (calls in flight, a grown connection pool, a heap that has
// not reached its GC target yet), far below what a leak per call adds.
var soakBounds = []struct {
	name       string
	share      float64
	allowance  float64
	valueOf    func(soakSample) float64
	formatUnit func(float64) string
}{
	{"RSS", 0.30, 16 << 20, func(s soakSample) float64 { return float64(s.stats.RSS) }, func(v float64) string { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }},
	{"goroutines", 0.20, 20, func(s soakSample) float64 { return float64(s.goroutines) }, func(v float64) string { return fmt.Sprintf("%.0f", v) }},
	{"open FDs", 0.10, 10, func(s soakSample) float64 { return float64(s.stats.FDs) }, func(v float64) string { return fmt.Sprintf("%.0f", v) }},
}

type soakSample struct {
	stats      testenv.ProcStats
	goroutines int
}

// TestFaultSoak runs two credentials replicas and two gateways of this
// tree under mixed load — gateway reads with a pool of handles, credential
// writes, handles issued, used for a position stream and trips, and
// revoked — and samples each process.
func TestFaultSoak(t *testing.T) {
	f := newFleet(t, testenv.Redis(t).Addr, thisRelease(t), "../../../deploy/compose-policy.yaml", nil, nil, true)
	load := startFleetLoad(f, f.seed(t, time.Hour), fleetReaders)
	churn := startSessionChurn(f, load)

	procs := slices.Concat(f.creds, f.gateways)
	samples := make([][]soakSample, len(procs))
	start := time.Now()
	for next := start.Add(soakWarmup); next.Before(start.Add(soakDuration)); next = next.Add(soakInterval) {
		time.Sleep(time.Until(next)) // the sampling schedule
		for i, r := range procs {
			st, err := testenv.ReadProcStats(r.proc.Pid())
			if err != nil {
				t.Fatalf("%s: %v", r.name, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			g, err := scrapeGoroutines(ctx, r.metricsAddr)
			cancel()
			if err != nil {
				t.Fatalf("%s: %v", r.name, err)
			}
			samples[i] = append(samples[i], soakSample{stats: st, goroutines: g})
		}
	}
	close(churn.stop)
	<-churn.done
	writes := load.finish()
	calls, failed := load.counts()
	if failed > 0 {
		t.Errorf("%d of %d calls failed during the soak:\n%s", failed, calls, load.failures())
	}

	var report []string
	for i, r := range procs {
		line := r.name + ":"
		for _, b := range soakBounds {
			first, last := floorOf(samples[i][:soakWindow], b.valueOf), floorOf(samples[i][len(samples[i])-soakWindow:], b.valueOf)
			limit := first*(1+b.share) + b.allowance
			if last > limit {
				t.Errorf("%s: %s grew from %s to %s during the soak, more than the %s allowed (a leak?)",
					r.name, b.name, b.formatUnit(first), b.formatUnit(last), b.formatUnit(limit))
			}
			line += fmt.Sprintf(" %s %s→%s", b.name, b.formatUnit(first), b.formatUnit(last))
		}
		report = append(report, line)
	}
	checked := f.verifyWrites(t, writes)
	t.Logf("reliability: soak %s (%s warm-up) under mixed load: %d calls (%d streams), %d failed; %d writes stored once; %s",
		soakDuration-soakWarmup, soakWarmup, calls, churn.streams, failed, checked, strings.Join(report, "; "))
}

func floorOf(samples []soakSample, value func(soakSample) float64) float64 {
	low := value(samples[0])
	for _, s := range samples[1:] {
		low = min(low, value(s))
	}
	return low
}

// sessionChurn issues a handle, watches positions with it until the first
// update, lists the units and the first one's trips and revokes it, over
// and over: the session
// lifecycle and streams, whose goroutines must all end.
type sessionChurn struct {
	stop    chan struct{}
	done    chan struct{}
	streams int
}

func startSessionChurn(f *fleet, load *fleetLoad) *sessionChurn {
	c := &sessionChurn{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for i := 0; ; i++ {
			select {
			case <-c.stop:
				return
			case <-time.After(200 * time.Millisecond): // pacing: about 4 sessions/s
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			id := []string{"seed-wialon", "seed-fleetup"}[i%2]
			resp, err := f.sessions.IssueSession(asAdmin(ctx), &credentialsv1.IssueSessionRequest{TenantId: faultTenant, CredentialId: id, Ttl: durationpb.New(time.Minute)})
			load.record("IssueSession (churn)", err)
			if err == nil {
				h := resp.GetHandle()
				load.record("WatchPositions", watchOnce(ctx, f.telematics, h))
				c.streams++
				units, err := f.telematics.ListUnits(withHandle(ctx, h), &telematicsv1.ListUnitsRequest{})
				load.record("ListUnits (churn)", err)
				if err == nil && len(units.GetUnits()) > 0 {
					now := time.Now()
					_, err = f.telematics.ListTrips(withHandle(ctx, h), &telematicsv1.ListTripsRequest{UnitId: units.GetUnits()[0].GetUnitId(),
						StartTime: timestamppb.New(now.Add(-2 * time.Hour)), EndTime: timestamppb.New(now)})
					load.record("ListTrips", err)
				}
				_, err = f.sessions.RevokeSession(asAdmin(ctx), &credentialsv1.RevokeSessionRequest{Handle: h})
				load.record("RevokeSession", err)
			}
			cancel()
		}
	}()
	return c
}

// watchOnce opens a position stream, waits for its first message and
// closes it, as a caller that goes away does.
func watchOnce(ctx context.Context, c telematicsv1.TelematicsServiceClient, h string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.WatchPositions(withHandle(ctx, h), &telematicsv1.WatchPositionsRequest{})
	if err != nil {
		return err
	}
	_, err = stream.Recv()
	return err
}
