package app_test

// The fault suite's deployment of real processes: `fleetbroker credentials`
// and `fleetbroker gateway`, two replicas each as deploy/kubernetes runs
// them, started from a built binary (this tree's, or an earlier release's)
// on a Vault server on file storage and a Redis. The test plays
// Kubernetes: each replica keeps its address across restarts (a
// StatefulSet pod's name), a replica is listed as an endpoint only once its
// readiness (health "") reports SERVING and stops being listed the moment
// it is told to terminate, the gateways reach the credentials service
// through an L4 balancer as they do through a ClusterIP Service, and
// callers balance each call over the listed endpoints, as a mesh does.

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// Timings of the fleet's processes. The drain period is shorter than the
// production 5 s, to keep the suite short: it only has to outlast the
// endpoint lag here; everything else is the production default.
const (
	fleetDrainPeriod   = 2 * time.Second
	fleetShutdownGrace = 10 * time.Second
	// fleetStopBound is what Kubernetes' terminationGracePeriodSeconds
	// gives a pod before SIGKILL.
	fleetStopBound  = fleetDrainPeriod + fleetShutdownGrace + 5*time.Second
	fleetReadyBound = 60 * time.Second
	// fleetEndpointLag is how long after SIGTERM callers still send to a
	// terminating pod: endpoint updates travel through the API server and
	// kube-proxy or the mesh's control plane.
	fleetEndpointLag = time.Second
)

// release is one build of fleetbroker: its binary and what it understands.
type release struct {
	name string // "this tree", or the commit
	bin  string
	// current: the binary has this release's flags (--handle-key-file,
	// --drain-period, the upgrade flags); the previous release has none.
	current bool
	// preStop is the sleep of the release's pod preStop hook: the
	// previous release did not drain by itself, so its manifests kept a
	// terminating pod serving for 5 s before SIGTERM. This release drains
	// on SIGTERM (--drain-period) and needs none.
	preStop time.Duration
}

func thisRelease(t *testing.T) release {
	t.Helper()
	return release{name: "this tree", bin: testenv.BuildWorkingTree(t, "./cmd/fleetbroker"), current: true}
}

// fleet is the deployment; see the file comment.
type fleet struct {
	vault              *testenv.VaultFileServer
	credToken, gwToken string
	redisAddr, prefix  string
	sim                *simulator.Simulator
	simHost            string
	keyFile            string // --handle-key-file of both services
	policyFile         string
	// metrics gives every replica a metrics listener (for sampling).
	metrics bool

	credLB                     *l4Balancer
	credEndpoints, gwEndpoints *endpoints
	creds, gateways            []*fleetReplica
	credsConn, gwConn          *grpc.ClientConn
	credsClient                credentialsv1.CredentialServiceClient
	sessions                   credentialsv1.SessionServiceClient
	telematics                 telematicsv1.TelematicsServiceClient
}

// fleetReplica is one pod: a fixed address and the process running there now.
type fleetReplica struct {
	name, addr, metricsAddr string
	release                 release
	args                    []string // the flags it runs with (beyond the fleet's)
	proc                    *testenv.Process
	stopped                 []*testenv.Process // earlier processes of this pod
}

// newFleet starts Vault (file storage, each service with its own token and
// policy from deploy/vault), a simulator, and two replicas of each service
// of rel, each started with its extra flags (credArgs, gwArgs), once all
// are ready. policyFile is the credentials service's --policy.
func newFleet(t *testing.T, redisAddr string, rel release, policyFile string, credArgs, gwArgs []string, metrics bool) *fleet {
	t.Helper()
	f := &fleet{redisAddr: redisAddr, prefix: testenv.RedisPrefix(t), policyFile: policyFile, metrics: metrics}
	f.vault = testenv.VaultFile(t)
	f.vault.Init(t)
	f.credToken, f.gwToken = setUpTransit(t, f.vault)
	f.sim = simulator.New(withoutWialonLimits(simulator.Config{Demo: true, Units: 3}))
	simServer := newSimServer(t, f.sim)
	f.simHost = simServer
	// As the runbook makes one: head -c 32 /dev/urandom | base64.
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	f.keyFile = filepath.Join(t.TempDir(), "handle-keys")
	if err := os.WriteFile(f.keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	f.credLB = newL4Balancer(t)
	f.credEndpoints = newEndpoints(t, "fleet-credentials")
	f.gwEndpoints = newEndpoints(t, "fleet-gateway")
	for i := range 2 {
		f.creds = append(f.creds, f.newReplica(t, fmt.Sprintf("credentials-%d", i)))
		f.gateways = append(f.gateways, f.newReplica(t, fmt.Sprintf("gateway-%d", i)))
	}
	for _, r := range f.creds {
		f.start(t, r, rel, credArgs)
	}
	for _, r := range f.gateways {
		f.start(t, r, rel, gwArgs)
	}
	f.credsConn, f.gwConn = f.credEndpoints.conn, f.gwEndpoints.conn
	f.credsClient = credentialsv1.NewCredentialServiceClient(f.credsConn)
	f.sessions = credentialsv1.NewSessionServiceClient(f.credsConn)
	f.telematics = telematicsv1.NewTelematicsServiceClient(f.gwConn)
	t.Cleanup(func() { f.assertNoCrash(t) })
	return f
}

func (f *fleet) newReplica(t *testing.T, name string) *fleetReplica {
	t.Helper()
	r := &fleetReplica{name: name, addr: freeLoopbackAddr(t)}
	if f.metrics {
		r.metricsAddr = freeLoopbackAddr(t)
	}
	return r
}

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// isCredentials tells the pod's service by its name.
func (r *fleetReplica) isCredentials() bool { return strings.HasPrefix(r.name, "credentials") }

// commandLine is the pod's command line with rel's binary: the flags the
// deployment sets for every replica of its service, then extra.
func (f *fleet) commandLine(r *fleetReplica, rel release, extra []string) []string {
	args := []string{"--listen", r.addr, "--insecure", "--audit-log", "-",
		"--vault-addr", f.vault.Addr, "--redis-addr", f.redisAddr, "--redis-prefix", f.prefix,
		"--allowed-upstreams", f.simHost, "--metrics-listen", r.metricsAddr, "--log-level", "info",
		"--shutdown-grace", fleetShutdownGrace.String()}
	if rel.current {
		args = append(args, "--handle-key-file", f.keyFile, "--drain-period", fleetDrainPeriod.String())
	}
	if r.isCredentials() {
		if rel.current {
			// Every acknowledged write is checked by logging in with it:
			// more logins a minute than Wialon allows an IP. The fleet
			// tests are about faults; the login budget has its own tests
			// (services/gateway TestWialonLoginBudgetKeepsTheIPUnblocked).
			args = append(args, "--wialon-login-limit", "1000000", "--wialon-failed-login-limit", "1000000")
		}
		args = append([]string{"credentials", "--policy", f.policyFile}, args...)
	} else {
		args = append([]string{"gateway", "--credentials-addr", f.credLB.addr, "--credentials-insecure", "--fleetup-rate", "100"}, args...)
	}
	return append(args, extra...)
}

// start runs rel on the pod with extra flags, waits until it is ready and
// lists it as an endpoint.
func (f *fleet) start(t *testing.T, r *fleetReplica, rel release, extra []string) {
	t.Helper()
	r.release, r.args = rel, extra
	cmd := exec.Command(rel.bin, f.commandLine(r, rel, extra)...)
	token := f.credToken
	if !r.isCredentials() {
		token = f.gwToken
	}
	cmd.Env = append(os.Environ(), "FLEETBROKER_VAULT_TOKEN="+token, "FLEETBROKER_CREDENTIALS_API_KEY="+gatewayAPIKey)
	r.proc = testenv.StartProcess(t, r.name+" ("+rel.name+")", cmd)
	waitProcessServing(t, r.proc, r.addr)
	f.list(r, true)
}

// list adds the pod to (or removes it from) its service's endpoints.
func (f *fleet) list(r *fleetReplica, ready bool) {
	if r.isCredentials() {
		f.credEndpoints.set(r.addr, ready)
		f.credLB.set(r.addr, ready)
	} else {
		f.gwEndpoints.set(r.addr, ready)
	}
}

// roll replaces the pod's process as a StatefulSet rolling update does: it
// gets SIGTERM (after its preStop hook, if its release has one) and stops
// being an endpoint fleetEndpointLag after its termination began, must
// exit cleanly within the termination grace period, and its successor —
// rel with extra flags — is started on the same address and listed once
// ready. It returns how long the pod was out of service: from the start of
// its termination to its successor's listing.
func (f *fleet) roll(t *testing.T, r *fleetReplica, rel release, extra []string) time.Duration {
	t.Helper()
	out := time.Now()
	stopped := make(chan error, 1)
	go func() {
		// The pod's preStop hook, if its release's manifests have one,
		// runs before SIGTERM (a sleep: the delay is the hook itself).
		time.Sleep(r.release.preStop)
		stopped <- r.proc.Terminate(t, fleetStopBound)
	}()
	// Kubernetes sends SIGTERM and removes the pod from the endpoints at
	// the same time, and callers learn of the removal a moment later: the
	// drain period must cover that lag.
	time.Sleep(fleetEndpointLag)
	f.list(r, false)
	if err := <-stopped; err != nil {
		t.Errorf("%s did not shut down cleanly: %v\n%s", r.proc.Name, err, tailOf(r.proc.Output(), 4000))
	}
	r.stopped = append(r.stopped, r.proc)
	f.start(t, r, rel, extra)
	return time.Since(out)
}

// assertNoCrash fails if a running pod's process has exited, or if any
// process of the fleet logged a panic.
func (f *fleet) assertNoCrash(t *testing.T) {
	t.Helper()
	for _, r := range slices.Concat(f.creds, f.gateways) {
		if r.proc != nil && r.proc.Crashed() {
			t.Errorf("%s exited on its own: %v\n%s", r.proc.Name, r.proc.Err(), tailOf(r.proc.Output(), 4000))
		}
		for _, p := range append(slices.Clone(r.stopped), r.proc) {
			if p != nil && strings.Contains(p.Output(), "panic") {
				t.Errorf("%s panicked:\n%s", p.Name, tailOf(p.Output(), 8000))
			}
		}
	}
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// waitProcessServing waits until the process at addr reports SERVING
// (a readiness probe), failing at once if it exits.
func waitProcessServing(t *testing.T, p *testenv.Process, addr string) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(fleetReadyBound)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if p.Exited() {
			t.Fatalf("%s exited before it was ready: %v\n%s", p.Name, p.Err(), tailOf(p.Output(), 8000))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not SERVING after %s (%v, %v)\n%s", p.Name, fleetReadyBound, resp.GetStatus(), err, tailOf(p.Output(), 8000))
		}
		time.Sleep(50 * time.Millisecond) // a readiness probe's period
	}
}

// newSimServer serves the simulator on loopback and returns its host:port.
func newSimServer(t *testing.T, sim *simulator.Simulator) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: sim.Handler(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { _ = srv.Close() })
	return lis.Addr().String()
}

// endpoints is a service's endpoint list as callers' client-side balancing
// sees it (a mesh's endpoint discovery): a manual resolver, updated as
// pods become ready or terminate, behind a round_robin connection.
type endpoints struct {
	mu    sync.Mutex
	ready []string
	r     *manual.Resolver
	conn  *grpc.ClientConn
}

func newEndpoints(t *testing.T, scheme string) *endpoints {
	t.Helper()
	e := &endpoints{r: manual.NewBuilderWithScheme(scheme)}
	e.r.InitialState(resolver.State{})
	conn, err := grpc.NewClient(scheme+":///service", grpc.WithResolvers(e.r),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	conn.Connect()
	t.Cleanup(func() { conn.Close() })
	e.conn = conn
	return e
}

func (e *endpoints) set(addr string, ready bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ready = slices.DeleteFunc(e.ready, func(a string) bool { return a == addr })
	if ready {
		e.ready = append(e.ready, addr)
	}
	state := resolver.State{}
	for _, a := range e.ready {
		state.Endpoints = append(state.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{{Addr: a}}})
	}
	e.r.UpdateState(state)
}

// l4Balancer forwards each new TCP connection to one of its ready
// backends, round robin, as kube-proxy does for a ClusterIP Service: a
// connection stays with its backend until either side closes it.
type l4Balancer struct {
	addr string
	lis  net.Listener

	mu       sync.Mutex
	backends []string
	next     int
	conns    map[net.Conn]struct{}
}

func newL4Balancer(t *testing.T) *l4Balancer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &l4Balancer{addr: lis.Addr().String(), lis: lis, conns: map[net.Conn]struct{}{}}
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go b.forward(c)
		}
	}()
	t.Cleanup(func() {
		_ = lis.Close()
		b.mu.Lock()
		defer b.mu.Unlock()
		for c := range b.conns {
			_ = c.Close()
		}
	})
	return b
}

func (b *l4Balancer) set(addr string, ready bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.backends = slices.DeleteFunc(b.backends, func(a string) bool { return a == addr })
	if ready {
		b.backends = append(b.backends, addr)
	}
}

func (b *l4Balancer) pick() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.backends) == 0 {
		return "", false
	}
	b.next++
	return b.backends[b.next%len(b.backends)], true
}

func (b *l4Balancer) forward(c net.Conn) {
	target, ok := b.pick()
	if !ok {
		_ = c.Close()
		return
	}
	up, err := net.DialTimeout("tcp", target, 2*time.Second)
	if err != nil {
		_ = c.Close()
		return
	}
	b.mu.Lock()
	b.conns[c], b.conns[up] = struct{}{}, struct{}{}
	b.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) { _, _ = io.Copy(dst, src); done <- struct{}{} }
	go pipe(up, c)
	go pipe(c, up)
	<-done
	_ = c.Close()
	_ = up.Close()
	<-done
	b.mu.Lock()
	delete(b.conns, c)
	delete(b.conns, up)
	b.mu.Unlock()
}

// fleetLoad is the callers of a fleet: readers calling the gateways with
// a pool of handles, and a writer storing new credentials at the
// credentials service, issuing a handle for each and calling the gateway
// with it once (a cold account: a login through the credentials service).
// Every call is recorded; a rolling update must fail none.
type fleetLoad struct {
	f    *fleet
	stop chan struct{}
	wg   sync.WaitGroup

	mu      sync.Mutex
	handles []string
	calls   int
	failed  []loadFailure
	writes  []writeResult // PutCredential, acknowledged or not
	phase   string
}

type loadFailure struct {
	what, phase string
	at          time.Time
	err         error
}

// startFleetLoad starts readers over handles and one writer.
func startFleetLoad(f *fleet, handles []string, readers int) *fleetLoad {
	l := &fleetLoad{f: f, stop: make(chan struct{}), handles: slices.Clone(handles), phase: "start"}
	for i := range readers {
		l.wg.Go(func() { l.read(i) })
	}
	l.wg.Go(l.write)
	return l
}

// setPhase labels the calls that follow, for the report.
func (l *fleetLoad) setPhase(p string) {
	l.mu.Lock()
	l.phase = p
	l.mu.Unlock()
}

func (l *fleetLoad) record(what string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls++
	if err != nil {
		l.failed = append(l.failed, loadFailure{what: what, phase: l.phase, at: time.Now(), err: err})
	}
}

func (l *fleetLoad) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *fleetLoad) read(worker int) {
	for i := worker; !l.stopped(); i++ {
		l.mu.Lock()
		h := l.handles[i%len(l.handles)]
		l.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		var err error
		what := "ListUnits"
		if i%2 == 0 {
			what = "GetLatestPositions"
			_, err = l.f.telematics.GetLatestPositions(withHandle(ctx, h), &telematicsv1.GetLatestPositionsRequest{UnitIds: []string{"10001"}})
		} else {
			err = listUnits(ctx, l.f.telematics, h)
		}
		cancel()
		l.record(what, err)
		time.Sleep(20 * time.Millisecond) // pacing: about 50 calls/s per reader
	}
}

func (l *fleetLoad) write() {
	for i := 0; !l.stopped(); i++ {
		r := writeResult{id: fmt.Sprintf("load-%d", i), token: randomToken(), start: time.Now()}
		l.f.sim.AddWialonToken(r.token)
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		_, r.err = l.f.credsClient.PutCredential(asAdmin(ctx), &credentialsv1.PutCredentialRequest{
			TenantId: faultTenant, CredentialId: r.id, RequestId: "put-" + r.id, SkipValidation: true,
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: r.token, BaseUrl: "http://" + l.f.simHost}},
		})
		r.end = time.Now()
		l.record("PutCredential", r.err)
		l.mu.Lock()
		l.writes = append(l.writes, r)
		l.mu.Unlock()
		if r.err == nil {
			resp, err := l.f.sessions.IssueSession(asAdmin(ctx), &credentialsv1.IssueSessionRequest{
				TenantId: faultTenant, CredentialId: r.id, Ttl: durationpb.New(time.Hour), RequestId: "issue-" + r.id})
			l.record("IssueSession", err)
			if err == nil {
				err = listUnits(ctx, l.f.telematics, resp.GetHandle())
				l.record("ListUnits (cold account)", err)
				if err == nil {
					l.mu.Lock()
					l.handles = append(l.handles, resp.GetHandle())
					l.mu.Unlock()
				}
			}
		}
		cancel()
		time.Sleep(100 * time.Millisecond) // pacing: about 8 writes/s
	}
}

// finish stops the callers and returns every write.
func (l *fleetLoad) finish() []writeResult {
	close(l.stop)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.writes)
}

// failures is a report of the failed calls (empty: none failed).
func (l *fleetLoad) failures() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for i, f := range l.failed {
		if i == 20 {
			fmt.Fprintf(&b, "… and %d more\n", len(l.failed)-i)
			break
		}
		fmt.Fprintf(&b, "%s %s during %q: %v\n", f.at.Format("15:04:05.000"), f.what, f.phase, f.err)
	}
	return b.String()
}

func (l *fleetLoad) counts() (calls, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls, len(l.failed)
}

// waitCalls waits until n more calls have been made, so each step of a
// rollout runs under load.
func (l *fleetLoad) waitCalls(t *testing.T, n int) {
	t.Helper()
	start, _ := l.counts()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if calls, _ := l.counts(); calls >= start+n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d calls in 60s", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scrapeGoroutines reads go_goroutines from a replica's metrics listener.
func scrapeGoroutines(ctx context.Context, metricsAddr string) (int, error) {
	g, err := launch.ScrapeMetric(ctx, metricsAddr, "go_goroutines")
	return int(g), err
}
