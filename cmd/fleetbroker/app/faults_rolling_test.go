package app_test

// Rolling restarts and the rolling upgrade from the previous release, on
// real processes (faults_fleet_test.go) under load: no caller call may
// fail, no acknowledged write may be lost or applied twice, handles issued
// before stay valid until they expire, and no process may crash.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// previousRelease is the commit of the release before this one: the last
// main before issues 7 and 8 changed the stored and wire formats (the
// associated data, the token cache key, the handle checksum, the mint RPC,
// the put script). The upgrade test builds it from git history.
const previousRelease = "a4d8f9a"

// fleetReaders is how many callers read through the gateways meanwhile.
const fleetReaders = 4

// seed stores the demo Wialon and FleetUp accounts and returns handles for
// them (ttl each).
func (f *fleet) seed(t *testing.T, ttl time.Duration) []string {
	t.Helper()
	ctx := callCtx(t, 30*time.Second)
	puts := []*credentialsv1.PutCredentialRequest{
		{TenantId: faultTenant, CredentialId: "seed-wialon", Secret: &credentialsv1.PutCredentialRequest_Wialon{
			Wialon: &credentialsv1.WialonSecret{Token: simulator.DemoWialonToken, BaseUrl: "http://" + f.simHost}}},
		{TenantId: faultTenant, CredentialId: "seed-fleetup", Secret: &credentialsv1.PutCredentialRequest_Fleetup{
			Fleetup: &credentialsv1.FleetUpSecret{ApiKey: simulator.DemoFleetUpAPIKey, AccountId: simulator.DemoFleetUpAccountID,
				Secret: simulator.DemoFleetUpSecret, BaseUrl: "http://" + f.simHost}}},
	}
	var handles []string
	for _, p := range puts {
		if _, err := f.credsClient.PutCredential(asAdmin(ctx), p); err != nil {
			t.Fatalf("seed %s: %v", p.GetCredentialId(), err)
		}
		for range 3 {
			handles = append(handles, f.issue(t, p.GetCredentialId(), ttl))
		}
	}
	for _, h := range handles {
		if err := listUnits(ctx, f.telematics, h); err != nil {
			t.Fatalf("a seeded handle before any rollout: %v", err)
		}
	}
	return handles
}

func (f *fleet) issue(t *testing.T, id string, ttl time.Duration) string {
	t.Helper()
	resp, err := f.sessions.IssueSession(asAdmin(callCtx(t, 15*time.Second)), &credentialsv1.IssueSessionRequest{
		TenantId: faultTenant, CredentialId: id, Ttl: durationpb.New(ttl)})
	if err != nil {
		t.Fatalf("IssueSession(%s): %v", id, err)
	}
	return resp.GetHandle()
}

// verifyWrites checks every acknowledged write of the load: stored once
// (version 1) and holding exactly the secret written — a new handle for it
// works through the gateway, which makes the credentials service decrypt
// it and log in with it, and the simulator knows only the written token.
// Unacknowledged writes (there should be none) are retried with their
// request ids first. It returns how many it checked.
func (f *fleet) verifyWrites(t *testing.T, writes []writeResult) int {
	t.Helper()
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan writeResult)
	for range 8 {
		wg.Go(func() {
			for r := range next {
				if err := f.verifyWrite(t, r); err != nil {
					mu.Lock()
					t.Error(err)
					mu.Unlock()
				}
			}
		})
	}
	for _, r := range writes {
		next <- r
	}
	close(next)
	wg.Wait()
	list, err := f.credsClient.ListCredentials(asAdmin(callCtx(t, 15*time.Second)), &credentialsv1.ListCredentialsRequest{TenantId: faultTenant, PageSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, c := range list.GetCredentials() {
		if seen[c.GetCredentialId()] {
			t.Errorf("credential %s listed twice", c.GetCredentialId())
		}
		seen[c.GetCredentialId()] = true
	}
	return len(writes)
}

func (f *fleet) verifyWrite(t *testing.T, r writeResult) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if r.err != nil {
		resp, err := f.credsClient.PutCredential(asAdmin(ctx), &credentialsv1.PutCredentialRequest{
			TenantId: faultTenant, CredentialId: r.id, RequestId: "put-" + r.id, SkipValidation: true,
			Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: r.token, BaseUrl: "http://" + f.simHost}},
		})
		if err != nil || resp.GetCredential().GetVersion() != 1 {
			return fmt.Errorf("refused write %s retried with its request id: %v, %v; want version 1", r.id, resp, err)
		}
	}
	got, err := f.credsClient.GetCredential(asAdmin(ctx), &credentialsv1.GetCredentialRequest{TenantId: faultTenant, CredentialId: r.id})
	if err != nil {
		return fmt.Errorf("acknowledged write %s: %v", r.id, err)
	}
	if v := got.GetCredential().GetVersion(); v != 1 {
		return fmt.Errorf("write %s has version %d, want 1 (applied exactly once)", r.id, v)
	}
	resp, err := f.sessions.IssueSession(asAdmin(ctx), &credentialsv1.IssueSessionRequest{TenantId: faultTenant, CredentialId: r.id, Ttl: durationpb.New(time.Minute)})
	if err != nil {
		return fmt.Errorf("IssueSession for write %s: %v", r.id, err)
	}
	if err := listUnits(ctx, f.telematics, resp.GetHandle()); err != nil {
		return fmt.Errorf("write %s does not open to the secret written (a gateway call with a new handle): %v", r.id, err)
	}
	return nil
}

// TestFaultRollingRestart: both services restarted one pod at a time —
// gateways, then the credentials service — under load from callers that
// balance each call over the ready pods. No call fails: a terminating
// pod leaves the endpoints at once, drains, and finishes its calls in
// flight; its successor is listed once ready. Every acknowledged write is
// stored once.
func TestFaultRollingRestart(t *testing.T) {
	rel := thisRelease(t)
	f := newFleet(t, testenv.Redis(t).Addr, rel, "../../../deploy/compose-policy.yaml", nil, nil, false)
	load := startFleetLoad(f, f.seed(t, time.Hour), fleetReaders)
	load.waitCalls(t, 100)
	var outOfService []string
	for _, r := range []*fleetReplica{f.gateways[1], f.gateways[0], f.creds[1], f.creds[0]} {
		load.setPhase("restarting " + r.name)
		out := f.roll(t, r, rel, r.args)
		outOfService = append(outOfService, fmt.Sprintf("%s %s", r.name, out.Round(10*time.Millisecond)))
		load.waitCalls(t, 100)
	}
	writes := load.finish()
	calls, failed := load.counts()
	if failed > 0 {
		t.Errorf("%d of %d calls failed during the rolling restart:\n%s", failed, calls, load.failures())
	}
	checked := f.verifyWrites(t, writes)
	t.Logf("reliability: rolling restart of 2 gateways and 2 credentials replicas (SIGTERM, drain %s) under load: %d calls, %d failed; pods out of service for %v; %d acknowledged writes stored once",
		fleetDrainPeriod, calls, failed, outOfService, checked)
}

// TestFaultRollingUpgrade upgrades a fleet of the previous release —
// two credentials replicas and two gateways, built from git history —
// to this tree, one process at a time under load, in the order
// docs/operations.md prescribes:
//
//  1. the credentials service with --write-legacy-formats (CRC32 handles,
//     version 1 associated data, which the previous release reads) and
//     --legacy-resolve-secret (for gateways of the previous release);
//  2. the gateways;
//  3. the credentials service without those flags, which closes the
//     legacy-handle window;
//  4. fleetbroker migrate, under load, until it re-encrypts nothing;
//  5. the credentials service with --legacy-associated-data=false.
//
// No call fails; every write acknowledged along the way is stored once and
// opens; handles the previous release issued still work afterwards, until
// they expire; no process crashes or fails to shut down cleanly.
func TestFaultRollingUpgrade(t *testing.T) {
	// Build both first: the previous release from git history (a shallow
	// clone fails here, with how to fix it), this tree as it is.
	// Its pods run as its manifests ran them: with a preStop sleep (5 s
	// there, the fleet's drain period here) before SIGTERM.
	prev := release{name: previousRelease, bin: testenv.BuildAtCommit(t, previousRelease, "./cmd/fleetbroker"), preStop: fleetDrainPeriod}
	next := thisRelease(t)
	// The operator's files as the previous release had them: the policy
	// (its principals without a source prefix, which this release still
	// reads) is kept through the upgrade.
	policy := previousFile(t, "deploy/compose-policy.yaml")

	f := newFleet(t, testenv.Redis(t).Addr, prev, policy, nil, nil, false)
	handles := f.seed(t, time.Hour)
	// A handle of the previous release that expires during the test.
	const shortTTL = 45 * time.Second
	short := f.issue(t, "seed-wialon", shortTTL)
	shortExpires := time.Now().Add(shortTTL)
	for _, h := range append(handles, short) {
		if len(h) != handle.LegacyLength {
			t.Fatalf("the previous release issued a handle of %d characters, want its CRC32 form (%d)", len(h), handle.LegacyLength)
		}
	}
	previousHandles := append(handles, short)
	load := startFleetLoad(f, handles, fleetReaders)
	load.waitCalls(t, 100)

	window := []string{"--write-legacy-formats", "--legacy-resolve-secret"}
	step := func(name string, r *fleetReplica, rel release, args []string) {
		t.Helper()
		load.setPhase(name + ": " + r.name)
		f.roll(t, r, rel, args)
		load.waitCalls(t, 100)
	}
	start := time.Now()
	for _, r := range []*fleetReplica{f.creds[1], f.creds[0]} {
		step("1. credentials with the compatibility flags", r, next, window)
	}
	if h := f.issue(t, "seed-wialon", time.Hour); len(h) != handle.LegacyLength {
		t.Errorf("during the window the credentials service issued a %d-character handle, want the CRC32 form (%d): gateways of the previous release must read it", len(h), handle.LegacyLength)
	}
	for _, r := range []*fleetReplica{f.gateways[1], f.gateways[0]} {
		step("2. gateways", r, next, nil)
	}
	for _, r := range []*fleetReplica{f.creds[1], f.creds[0]} {
		step("3. credentials without the compatibility flags", r, next, nil)
	}
	if h := f.issue(t, "seed-wialon", time.Hour); len(h) == handle.LegacyLength {
		t.Error("after the window the credentials service still issues CRC32 handles")
	}
	load.setPhase("4. fleetbroker migrate")
	migrated := f.migrate(t, next)
	if again := f.migrate(t, next); again != 0 {
		t.Errorf("a second fleetbroker migrate re-encrypted %d secrets, want 0", again)
	}
	load.waitCalls(t, 100)
	for _, r := range []*fleetReplica{f.creds[1], f.creds[0]} {
		step("5. credentials with --legacy-associated-data=false", r, next, []string{"--legacy-associated-data=false"})
	}
	upgradeTook := time.Since(start)
	writes := load.finish()
	calls, failed := load.counts()
	if failed > 0 {
		t.Errorf("%d of %d calls failed during the upgrade:\n%s", failed, calls, load.failures())
	}

	// Nothing lost: every write opens under the final settings, which
	// refuse version 1 associated data — so migrate re-sealed them all,
	// those of the previous release included.
	checked := f.verifyWrites(t, writes)
	for _, id := range []string{"seed-wialon", "seed-fleetup"} {
		if err := listUnits(callCtx(t, 15*time.Second), f.telematics, f.issue(t, id, time.Minute)); err != nil {
			t.Errorf("a credential the previous release stored, after the upgrade: %v", err)
		}
	}
	// Handles of the previous release still work, until they expire.
	for _, h := range previousHandles {
		if err := listUnits(callCtx(t, 15*time.Second), f.telematics, h); err != nil {
			t.Errorf("a handle of the previous release after the upgrade: %v", err)
		}
	}
	if wait := time.Until(shortExpires); wait > 0 {
		time.Sleep(wait) // the handle's own expiry: nothing to signal it
	}
	// Past its expiry (and the gateways' 5 s resolution cache) it is refused.
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := listUnits(callCtx(t, 15*time.Second), f.telematics, short)
		if status.Code(err) == codes.Unauthenticated {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a handle of the previous release 30s past its expiry: %v (reason %q), want UNAUTHENTICATED", err, apierr.Reason(err))
		}
		time.Sleep(200 * time.Millisecond) // pacing the probe calls
	}
	t.Logf("reliability: rolling upgrade from %s (2 credentials + 2 gateways, 10 process replacements, migrate under load) in %s: %d calls, %d failed; %d secrets re-encrypted by migrate, 0 on its second run; %d acknowledged writes stored once and opening with version 1 associated data refused; %d handles of the previous release valid after the upgrade, refused once expired",
		previousRelease, upgradeTook.Round(time.Second), calls, failed, migrated, checked, len(previousHandles))
}

// migrateSummary is fleetbroker migrate's last line.
var migrateSummary = regexp.MustCompile(`migrate: (\d+) seen, (\d+) re-encrypted, (\d+) already current, (\d+) skipped \(replaced or deleted meanwhile\), (\d+) failed`)

// migrate runs `fleetbroker migrate` of rel against the fleet's Vault and
// Redis, as the runbook says, and returns how many secrets it re-encrypted.
// It must succeed and fail none.
func (f *fleet) migrate(t *testing.T, rel release) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, rel.bin, "migrate", "--vault-addr", f.vault.Addr, "--redis-addr", f.redisAddr, "--redis-prefix", f.prefix)
	cmd.Env = append(os.Environ(), "FLEETBROKER_VAULT_TOKEN="+f.credToken)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with the test binary
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("fleetbroker migrate: %v\n%s", err, out)
	}
	m := migrateSummary.FindSubmatch(out)
	if m == nil {
		t.Fatalf("fleetbroker migrate printed no summary:\n%s", out)
	}
	if string(m[5]) != "0" {
		t.Errorf("fleetbroker migrate failed to open %s secrets:\n%s", m[5], out)
	}
	n, _ := strconv.Atoi(string(m[2]))
	return n
}

// previousFile writes path as the previous release has it into a
// temporary file and returns its name.
func previousFile(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("git", "show", previousRelease+":"+path).Output()
	if err != nil {
		t.Fatalf("git show %s:%s: %v (the upgrade test needs the repository's history)", previousRelease, path, err)
	}
	name := filepath.Join(t.TempDir(), filepath.Base(path))
	if err := os.WriteFile(name, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return name
}
