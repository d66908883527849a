package gateway_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// upstreamLog records what an upstream received and what it issued: the
// API keys, bearer JWTs and Wialon sids of every request, and the JWTs and
// eids its logins handed out.
type upstreamLog struct {
	mu       sync.Mutex
	received map[string]bool // "key:…", "jwt:…", "sid:…"
	issued   map[string]bool // "jwt:…", "sid:…"
	lastSID  string
}

// serveUpstream serves h on loopback, recording its traffic.
func serveUpstream(t *testing.T, h http.Handler) (string, *upstreamLog) {
	t.Helper()
	l := &upstreamLog{received: map[string]bool{}, issued: map[string]bool{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		l.note(r, body, rec.Body.Bytes())
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	}))
	t.Cleanup(srv.Close)
	return srv.URL, l
}

func (l *upstreamLog) note(r *http.Request, body, reply []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if k := r.Header.Get("x-api-key"); k != "" {
		l.received["key:"+k] = true
	}
	if jwt, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		l.received["jwt:"+jwt] = true
	}
	var out struct {
		Token string `json:"token"`
		EID   string `json:"eid"`
	}
	_ = json.Unmarshal(reply, &out)
	if out.Token != "" {
		l.issued["jwt:"+out.Token] = true
	}
	if out.EID != "" {
		l.issued["sid:"+out.EID] = true
	}
	if strings.HasSuffix(r.URL.Path, "/wialon/ajax.html") {
		form, _ := url.ParseQuery(string(body))
		if sid := form.Get("sid"); sid != "" {
			l.received["sid:"+sid] = true
			if form.Get("svc") == "core/search_items" {
				l.lastSID = sid
			}
		}
	}
}

// overlap returns what l received that other issued or was given.
func (l *upstreamLog) overlap(other *upstreamLog, otherKeys ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	other.mu.Lock()
	defer other.mu.Unlock()
	var out []string
	for v := range l.received {
		if other.issued[v] {
			out = append(out, v)
		}
	}
	for _, k := range otherKeys {
		if l.received["key:"+k] {
			out = append(out, "key:"+k)
		}
	}
	return out
}

func (l *upstreamLog) last() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastSID
}

func (l *upstreamLog) issuedSIDs() map[string]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]bool{}
	for v := range l.issued {
		if sid, ok := strings.CutPrefix(v, "sid:"); ok {
			out[sid] = true
		}
	}
	return out
}

// TestDeletedCredentialsSessionNeverServesItsSuccessor is issue 9's first
// finding as a user meets it: a credential is deleted and a new one is put
// under the same tenant and id (its version starts at 1 again), for another
// customer at another upstream. The gateway must not send the deleted
// credential's upstream session — its eid, or its JWT with its x-api-key
// and account — to the new credential's upstream.
func TestDeletedCredentialsSessionNeverServesItsSuccessor(t *testing.T) {
	const (
		newToken  = "NewCustomerToken0123456789abcdefNewCustomerToken0123456789abcdefNewCustA"
		newAPIKey = "new-customer-api-key-2b7e"
		newSecret = "new-customer-secret-5c1d"
		newAcct   = int64(777002)
	)
	for _, tt := range []struct {
		name   string
		putOld func(t *testing.T, st *stack)
		putNew func(t *testing.T, st *stack)
		// wantLogouts is how many upstream logouts the old upstream sees
		// once the new credential is used: Wialon sessions end, FleetUp
		// JWTs cannot be revoked.
		wantLogouts int64
	}{
		{"wialon", func(t *testing.T, st *stack) { st.put(t, "c", wialonSecret(canaryToken, st.simURL)) },
			func(t *testing.T, st *stack) { st.put(t, "c", wialonSecret(newToken, st.sim2URL)) }, 1},
		{"fleetup", func(t *testing.T, st *stack) {
			st.put(t, "c", fleetupSecret(canaryAPIKey, canaryAccount, canarySecret, st.simURL))
		},
			func(t *testing.T, st *stack) {
				st.put(t, "c", fleetupSecret(newAPIKey, newAcct, newSecret, st.sim2URL))
			}, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st := newStack(t, stackOptions{secondUpstream: true})
			st.sim2.AddWialonToken(newToken)
			st.sim2.AddFleetUpAccount(newAPIKey, newAcct, newSecret)
			gw := st.gateways[0]

			tt.putOld(t, st)
			oldCtx, _ := st.issue(t, "c")
			if _, err := gw.GetLatestPositions(oldCtx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Fatal(err)
			}
			logouts := st.sim.Stats().WialonLogouts
			if _, err := st.creds.DeleteCredential(context.Background(), &credentialsv1.DeleteCredentialRequest{TenantId: tenant, CredentialId: "c"}); err != nil {
				t.Fatal(err)
			}
			tt.putNew(t, st)
			newCtx, _ := st.issue(t, "c")
			if _, err := gw.GetLatestPositions(newCtx, &telematicsv1.GetLatestPositionsRequest{}); err != nil {
				t.Fatal(err)
			}
			if leaked := st.sim2Seen.overlap(st.simSeen, canaryAPIKey); len(leaked) > 0 {
				t.Fatalf("the new credential's upstream received %d upstream secrets of the deleted credential", len(leaked))
			}
			if got := st.sim.Stats().WialonLogouts - logouts; got != tt.wantLogouts {
				t.Errorf("the old upstream saw %d logouts, want %d (the deleted credential's session ended)", got, tt.wantLogouts)
			}
		})
	}
}

// TestRotationRebindsAndLogsOut: after a rotation, and after rotating back
// to the first secret, every call uses a session of the current secret
// only; each replaced secret's Wialon session is logged out upstream and
// leaves the cache.
func TestRotationRebindsAndLogsOut(t *testing.T) {
	const otherToken = "RotatedWialonToken0123456789abcdefRotatedWialonToken0123456789abcdefRota"
	st := newStack(t, stackOptions{})
	st.sim.AddWialonToken(otherToken)
	gw := st.gateways[0]
	// Stored without validation, so the simulator counts only the gateway's
	// logins and logouts.
	put := func(token string) {
		t.Helper()
		req := wialonSecret(token, st.simURL)
		req.SkipValidation = true
		st.put(t, "w", req)
	}
	put(canaryToken)
	ctx, _ := st.issue(t, "w") // the handle lives through rotations

	var used []string
	call := func() {
		t.Helper()
		if _, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
			t.Fatal(err)
		}
		used = append(used, st.simSeen.last())
	}
	before := st.sim.Stats()
	call()
	put(otherToken) // rotate
	call()
	put(canaryToken) // rotate back
	call()

	after := st.sim.Stats()
	if got := after.WialonLogins - before.WialonLogins; got != 3 {
		t.Errorf("%d logins for three secrets, want 3 (the first secret's session must not come back)", got)
	}
	if used[0] == used[1] || used[1] == used[2] || used[0] == used[2] {
		t.Errorf("a session was reused across rotations (sessions used: %d distinct of 3)", distinct(used))
	}
	if got := after.WialonLogouts - before.WialonLogouts; got != 2 {
		t.Errorf("%d upstream logouts, want 2: each replaced secret's session", got)
	}
	if after.ActiveWialonSessions != 1 {
		t.Errorf("%d Wialon sessions left open, want 1 (the current secret's)", after.ActiveWialonSessions)
	}
	if n := st.cachedSessions(t); n != 1 {
		t.Errorf("%d cached upstream sessions in Redis, want 1", n)
	}
}

func distinct(vs []string) int {
	m := map[string]bool{}
	for _, v := range vs {
		m[v] = true
	}
	return len(m)
}

// TestPurgeRetiredEndsDeletedCredentialsSessions: deleting a credential
// ends its upstream sessions at the next purge, on any replica, though
// nobody uses the credential again.
func TestPurgeRetiredEndsDeletedCredentialsSessions(t *testing.T) {
	st := newStack(t, stackOptions{replicas: 2})
	st.put(t, "w", wialonSecret(canaryToken, st.simURL))
	st.put(t, "keep", wialonSecret(canaryToken, st.simURL))
	for _, id := range []string{"w", "keep"} {
		ctx, _ := st.issue(t, id)
		if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := st.services[1].PurgeRetired(context.Background()); err != nil || n != 0 {
		t.Fatalf("PurgeRetired with nothing retired = %d, %v", n, err)
	}
	before := st.sim.Stats()
	if _, err := st.creds.DeleteCredential(context.Background(), &credentialsv1.DeleteCredentialRequest{TenantId: tenant, CredentialId: "w"}); err != nil {
		t.Fatal(err)
	}
	n, err := st.services[1].PurgeRetired(context.Background())
	if err != nil || n != 1 {
		t.Fatalf("PurgeRetired after a delete = %d, %v; want 1", n, err)
	}
	after := st.sim.Stats()
	if after.WialonLogouts != before.WialonLogouts+1 || after.ActiveWialonSessions != before.ActiveWialonSessions-1 {
		t.Errorf("the deleted credential's session was not logged out: %d → %d logouts, %d → %d open",
			before.WialonLogouts, after.WialonLogouts, before.ActiveWialonSessions, after.ActiveWialonSessions)
	}
	if n := st.cachedSessions(t); n != 1 {
		t.Errorf("%d cached upstream sessions in Redis, want 1 (the kept credential's)", n)
	}
	if n, err := st.services[0].PurgeRetired(context.Background()); err != nil || n != 0 {
		t.Fatalf("a second PurgeRetired = %d, %v; want nothing left to purge", n, err)
	}
}

func wialonSecret(token, baseURL string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: baseURL}}}
}

func fleetupSecret(apiKey string, acct int64, secret, baseURL string) *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{ApiKey: apiKey, AccountId: acct, Secret: secret, BaseUrl: baseURL}}}
}

// put stores req's secret as credential id of the test tenant.
func (st *stack) put(t *testing.T, id string, req *credentialsv1.PutCredentialRequest) {
	t.Helper()
	req.TenantId, req.CredentialId = tenant, id
	if _, err := st.creds.PutCredential(context.Background(), req); err != nil {
		t.Fatal(err)
	}
}

// cachedSessions counts the upstream sessions in this stack's token cache.
func (st *stack) cachedSessions(t *testing.T) int {
	t.Helper()
	keys, err := st.redis.Keys(context.Background(), st.prefix+":gw:{*}:tok:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, k := range keys {
		if !strings.HasSuffix(k, ":lock") {
			n++
		}
	}
	return n
}

// TestReplacedWialonSessionIsLoggedOut: a shared Wialon session that
// reaches --wialon-session-ttl is replaced by one new login, and the old
// one is logged out upstream rather than left open until it idles out.
func TestReplacedWialonSessionIsLoggedOut(t *testing.T) {
	const reuse = time.Second
	st := newStack(t, stackOptions{replicas: 2, wialonSessionTTL: reuse})
	st.put(t, "w", wialonSecret(canaryToken, st.simURL))
	ctx, _ := st.issue(t, "w")
	before := st.sim.Stats()
	if _, err := st.gateways[0].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatal(err)
	}
	first := st.simSeen.last()
	time.Sleep(reuse + 100*time.Millisecond) // the reuse bound is time itself
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := st.gateways[i%2].ListUnits(ctx, &telematicsv1.ListUnitsRequest{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if st.simSeen.last() == first {
		t.Fatal("the session was used past its reuse bound")
	}
	if got := st.sim.Stats().WialonLogins - before.WialonLogins; got != 2 {
		t.Fatalf("%d logins, want 2: one, and one replacement for every caller on both replicas", got)
	}
	// The logout runs beside the callers; wait for it, within a bound.
	deadline := time.Now().Add(5 * time.Second)
	for st.sim.Stats().WialonLogouts == before.WialonLogouts {
		if time.Now().After(deadline) {
			t.Fatal("the replaced session was never logged out")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if open := st.sim.Stats().ActiveWialonSessions; open != before.ActiveWialonSessions+1 {
		t.Fatalf("%d Wialon sessions open, want %d (only the replacement)", open, before.ActiveWialonSessions+1)
	}
}
