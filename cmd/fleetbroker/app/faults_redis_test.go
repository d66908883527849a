package app_test

// Redis faults beyond a crash of one server (faults_test.go): a frozen
// Redis (SIGSTOP: a stalled VM, a long fork, a network black hole) and a
// Sentinel failover, on the production builders as the rest of the suite.

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// redisCallBound is the production --redis-timeout: every Redis call, the
// wait for a pooled connection included, ends within it.
const redisCallBound = 2 * time.Second

// putWialonOnce stores a Wialon credential as a careful caller does: with
// a request id (derived from the credential id), so a retry after a lost
// answer returns the first result instead of writing again.
func (st *faultStack) putWialonOnce(ctx context.Context, id, token string) (*credentialsv1.PutCredentialResponse, error) {
	st.sim.AddWialonToken(token)
	return st.creds.PutCredential(asAdmin(ctx), &credentialsv1.PutCredentialRequest{
		TenantId: faultTenant, CredentialId: id, RequestId: "put-" + id,
		Secret:         &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: "http://" + st.simHost}},
		SkipValidation: true,
	})
}

// retryRefused retries every refused write with its request id, as its
// caller would after the RetryInfo delay, and marks it acknowledged: each
// must now succeed — created at version 1, whether or not the first
// attempt was applied — so verifyWrites then proves it stored exactly once.
func (st *faultStack) retryRefused(t *testing.T, results []writeResult) (retried int) {
	t.Helper()
	for i, r := range results {
		if r.err == nil {
			continue
		}
		resp, err := st.putWialonOnce(callCtx(t, 15*time.Second), r.id, r.token)
		if err != nil {
			t.Errorf("write %s retried with its request id after recovery: %v", r.id, err)
			continue
		}
		if v := resp.GetCredential().GetVersion(); v != 1 {
			t.Errorf("write %s retried with its request id: version %d, want 1 (applied once)", r.id, v)
		}
		results[i].err = nil
		retried++
	}
	return retried
}

// gatewayProbe calls the gateway with a warm handle every 50 ms until
// stopped and records what callers saw.
type gatewayProbe struct {
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	ok   int
	errs []error
}

func startGatewayProbe(st *faultStack, handle string) *gatewayProbe {
	p := &gatewayProbe{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(50 * time.Millisecond): // pacing the probe calls
			}
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			err := listUnits(ctx, st.telematics, handle)
			cancel()
			p.mu.Lock()
			if err == nil {
				p.ok++
			} else {
				p.errs = append(p.errs, err)
			}
			p.mu.Unlock()
		}
	}()
	return p
}

// finish stops the probe and fails unless every failed call was
// UNAVAILABLE with RetryInfo; it returns the calls answered and refused.
func (p *gatewayProbe) finish(t *testing.T) (ok, refused int) {
	t.Helper()
	close(p.stop)
	<-p.done
	for _, err := range p.errs {
		if status.Code(err) != codes.Unavailable || !hasRetryInfo(err) {
			t.Errorf("a gateway call during the fault: %v (reason %q); want UNAVAILABLE with RetryInfo", err, apierr.Reason(err))
		}
	}
	return p.ok, len(p.errs)
}

// TestFaultRedisFrozen: Redis stops answering without closing its
// connections (SIGSTOP) for five seconds. Every write and gateway call is
// answered within the Redis call bound — UNAVAILABLE STORE_UNAVAILABLE with
// RetryInfo, not a hang until Redis thaws; both services report
// NOT_SERVING within one readiness interval and SERVING within the target
// after the thaw; writes recover within the target. A write whose answer
// was lost may have been applied when Redis thawed: retried with its
// request id it returns that first result, so every write is stored
// exactly once.
func TestFaultRedisFrozen(t *testing.T) {
	rs := testenv.RedisOwn(t)
	st := newFaultStack(t, rs.Addr)
	ctx := callCtx(t, 15*time.Second)
	if _, err := st.putWialon(ctx, "warm", simulator.DemoWialonToken, true); err != nil {
		t.Fatal(err)
	}
	warm := st.issue(t, "warm")
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Fatal(err)
	}
	credHealth, gwHealth := watchHealth(t, st.credsConn), watchHealth(t, st.gwConn)
	w := startWriter(st)
	w.waitAcked(t, 20)
	probe := startGatewayProbe(st, warm)

	frozenAt := time.Now()
	rs.Freeze(t)
	thawed := false
	defer func() {
		if !thawed {
			rs.Thaw(t)
		}
	}()
	refusal := w.waitFailure(t, frozenAt)
	wantStatus(t, "a write while Redis is frozen", refusal, codes.Unavailable, apierr.ReasonStoreUnavailable, true)
	slowest := w.slowestSince(frozenAt)
	credDown := credHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, frozenAt, 2*notReadyBound).Sub(frozenAt)
	gwDown := gwHealth.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, frozenAt, 2*notReadyBound).Sub(frozenAt)
	if credDown > notReadyBound || gwDown > notReadyBound {
		t.Errorf("NOT_SERVING after %s (credentials) and %s (gateway), want ≤ %s", credDown, gwDown, notReadyBound)
	}
	if outage := time.Since(frozenAt); outage < 5*time.Second {
		time.Sleep(5*time.Second - outage) // the outage: five seconds
	}
	// Nothing waits for the thaw: every write answered during the freeze
	// (the one in flight at the freeze included) took at most the bound.
	if slowest = max(slowest, w.slowestSince(frozenAt)); slowest > redisCallBound+time.Second {
		t.Errorf("a write during the freeze took %s, want ≤ %s (the Redis call bound and some)", slowest, redisCallBound+time.Second)
	}

	thawing := time.Now()
	rs.Thaw(t)
	thawed = true
	backAt := time.Now()
	credUp := since(credHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, thawing, 30*time.Second), backAt)
	gwUp := since(gwHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, thawing, 30*time.Second), backAt)
	recovered := w.firstSuccessAfter(t, backAt, 30*time.Second)
	w.waitAcked(t, w.acked()+20)
	results := w.finish()
	answered, refused := probe.finish(t)
	if credUp > recoveryTarget || gwUp > recoveryTarget || recovered > recoveryTarget {
		t.Errorf("after the thaw: SERVING after %s (credentials) and %s (gateway), first write after %s; want all ≤ %s",
			credUp, gwUp, recovered, recoveryTarget)
	}
	if err := listUnits(callCtx(t, 15*time.Second), st.telematics, warm); err != nil {
		t.Errorf("gateway call after the thaw: %v", err)
	}
	acked := countAcked(results)
	retried := st.retryRefused(t, results)
	stored, _ := st.verifyWrites(t, results, false)
	t.Logf("reliability: redis frozen 5s: writes refused with STORE_UNAVAILABLE+RetryInfo within %s; gateway calls %d answered, %d UNAVAILABLE+RetryInfo; NOT_SERVING after %s (credentials), %s (gateway); SERVING %s / %s and writes %s after the thaw; %d acknowledged + %d refused and retried with their request ids = %d stored exactly once",
		slowest.Round(10*time.Millisecond), answered, refused, credDown.Round(10*time.Millisecond), gwDown.Round(10*time.Millisecond),
		credUp.Round(10*time.Millisecond), gwUp.Round(10*time.Millisecond), recovered.Round(10*time.Millisecond), acked, retried, stored)
}

// TestFaultSentinelFailover: under writes and gateway calls, the master of
// a Sentinel deployment (a master, two replicas, three Sentinels) crashes
// and the Sentinels promote a replica. Both services follow through the
// Sentinels (--redis-master-name); callers see UNAVAILABLE
// STORE_UNAVAILABLE with RetryInfo while there is no master and writes
// recover within the target once the Sentinels switched; every write
// acknowledged before, during or after the switch waited for a replica
// (WAIT) and is present exactly once on the new master; refused writes,
// retried with their request ids, are stored exactly once.
func TestFaultSentinelFailover(t *testing.T) {
	d := testenv.RedisSentinelFailover(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the Redis deployment at the end:\n%s", d.Describe(context.Background()))
		}
	})
	st := newFaultStackOn(t, app.RedisConfig{Addrs: d.Addrs, MasterName: d.MasterName})
	if !strings.Contains(st.logs.String(), "credential writes wait for one Redis replica") {
		t.Fatalf("the credentials service does not wait for a replica under Sentinel:\n%s", st.logs.String())
	}
	ctx := callCtx(t, 15*time.Second)
	if _, err := st.putWialon(ctx, "warm", simulator.DemoWialonToken, true); err != nil {
		t.Fatal(err)
	}
	warm := st.issue(t, "warm")
	if err := listUnits(ctx, st.telematics, warm); err != nil {
		t.Fatal(err)
	}
	credHealth := watchHealth(t, st.credsConn)
	w := startWriter(st)
	w.waitAcked(t, 20)
	probe := startGatewayProbe(st, warm)

	killedAt := time.Now()
	old := d.KillMaster(t)
	wantStatus(t, "a write while there is no master", w.waitFailure(t, killedAt), codes.Unavailable, apierr.ReasonStoreUnavailable, true)
	promoted, switchedAt := d.WaitFailover(t, old, 60*time.Second)
	recovered := w.firstSuccessAfter(t, switchedAt, 30*time.Second)
	outage := w.firstSuccessAfterTime(switchedAt).Sub(killedAt)
	w.waitAcked(t, w.acked()+20)
	results := w.finish()
	answered, refused := probe.finish(t)
	if recovered > recoveryTarget {
		t.Errorf("the first write succeeded %s after the Sentinels switched to %s, want ≤ %s", recovered, promoted, recoveryTarget)
	}
	// Readiness: SERVING again within the target of the switch, if the
	// outage was long enough to take the replica out at all.
	if credHealth.saw(healthpb.HealthCheckResponse_NOT_SERVING, killedAt) {
		if up := since(credHealth.waitStatus(t, healthpb.HealthCheckResponse_SERVING, killedAt, 30*time.Second), switchedAt); up > recoveryTarget {
			t.Errorf("credentials SERVING %s after the switch, want ≤ %s", up, recoveryTarget)
		}
	}
	if err := listUnits(callCtx(t, 15*time.Second), st.telematics, warm); err != nil {
		t.Errorf("gateway call after the failover: %v", err)
	}
	// Acknowledged writes are on the promoted master itself, not only
	// somewhere behind the Sentinels.
	acked := countAcked(results)
	master := testenv.RedisServer{Addr: promoted}.Client(t)
	for _, r := range results {
		if r.err != nil {
			continue
		}
		key := st.prefix + ":{" + faultTenant + "}:cred:" + r.id
		if n, err := master.Exists(callCtx(t, 15*time.Second), key).Result(); err != nil || n != 1 {
			t.Errorf("acknowledged write %s is not on the promoted master %s (%s: %d, %v)", r.id, promoted, key, n, err)
		}
	}
	retried := st.retryRefused(t, results)
	stored, _ := st.verifyWrites(t, results, false)
	t.Logf("reliability: sentinel failover (master SIGKILLed, down-after 3s): writes refused with STORE_UNAVAILABLE+RetryInfo; switch %s after the crash; first write %s after the switch (outage %s); gateway calls %d answered, %d UNAVAILABLE+RetryInfo; %d acknowledged (WAIT 1) all on the promoted master; %d refused and retried with their request ids; %d stored exactly once",
		switchedAt.Sub(killedAt).Round(10*time.Millisecond), recovered.Round(10*time.Millisecond), outage.Round(10*time.Millisecond),
		answered, refused, acked, retried, stored)
}

func countAcked(results []writeResult) int {
	n := 0
	for _, r := range results {
		if r.err == nil {
			n++
		}
	}
	return n
}

// slowestSince is the longest a write answered after t took, among those
// answered so far.
func (w *writer) slowestSince(t time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var slowest time.Duration
	for _, r := range w.results {
		if r.end.After(t) {
			slowest = max(slowest, r.end.Sub(r.start))
		}
	}
	return slowest
}

// firstSuccessAfterTime is when the first write that ended after t
// succeeded (zero if none did).
func (w *writer) firstSuccessAfterTime(t time.Time) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range w.results {
		if r.err == nil && r.end.After(t) {
			return r.end
		}
	}
	return time.Time{}
}
