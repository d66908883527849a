package credentials_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
)

type eventStream = grpc.ServerStreamingClient[credentialsv1.WatchCredentialEventsResponse]

// watchEvents opens a watch on r as principal and waits until it is in
// place (the server sends its header then).
func watchEvents(t *testing.T, r *replica, tenant, after string) eventStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(as(principalAcme), 60*time.Second)
	t.Cleanup(cancel)
	s, err := r.creds.WatchCredentialEvents(ctx, &credentialsv1.WatchCredentialEventsRequest{TenantId: tenant, AfterEventId: after})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Header(); err != nil {
		t.Fatal(err)
	}
	return s
}

type wantEvent struct {
	typ        credentialsv1.CredentialEventType
	credential string
	version    int64
}

// expectEvents receives len(want) events and checks them in order.
func expectEvents(t *testing.T, s eventStream, want ...wantEvent) []*credentialsv1.CredentialEvent {
	t.Helper()
	var got []*credentialsv1.CredentialEvent
	for i, w := range want {
		resp, err := s.Recv()
		if err != nil {
			t.Fatalf("event %d (want %v): %v", i, w.typ, err)
		}
		e := resp.GetEvent()
		if e.GetType() != w.typ || e.GetCredentialId() != w.credential || e.GetVersion() != w.version || e.GetEventId() == "" || e.GetEventTime() == nil {
			t.Fatalf("event %d = %v, want %v of %s version %d", i, e, w.typ, w.credential, w.version)
		}
		got = append(got, e)
	}
	return got
}

const (
	evCreated  = credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_CREATED
	evRotated  = credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_ROTATED
	evDeleted  = credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_DELETED
	evRejected = credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_REJECTED
	evExpiring = credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_EXPIRING
)

// TestCredentialEvents: changes made on one replica reach watchers on
// another, in order and for their tenant only — creation, rotation,
// rejection (by validation, by the gateway's report and by a refused login
// in MintUpstreamSession, once each), deletion — a retried request
// (request_id) announces nothing twice, and a watcher resumes after the
// last event it saw.
func TestCredentialEvents(t *testing.T) {
	for _, be := range connectBackends() {
		t.Run(be.name, func(t *testing.T) {
			w := newConnectWorld(t, be)
			a, b := w.start(replicaOptions{}), w.start(replicaOptions{})
			ctx := context.Background()
			acme := watchEvents(t, b, "acme", "")
			globex := watchEvents(t, b, "globex", "")

			put := func(tenant, token string) {
				t.Helper()
				if _, err := a.creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: tenant, CredentialId: "w",
					Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: w.simURL}}}); err != nil {
					t.Fatal(err)
				}
			}
			validate := func() {
				t.Helper()
				if _, err := a.creds.ValidateCredential(ctx, &credentialsv1.ValidateCredentialRequest{TenantId: "acme", CredentialId: "w"}); err != nil {
					t.Fatal(err)
				}
			}
			put("acme", canaryToken)
			put("acme", canaryToken)
			put("globex", canaryToken)
			w.sim.RemoveWialonToken(canaryToken) // the customer deleted the token in Wialon
			validate()
			validate() // still rejected: no second event
			// The customer makes a new token: Wialon refused the old one, and
			// the broker does not try a refused token again (the login guard).
			w.sim.AddWialonToken(canaryToken2)
			put("acme", canaryToken2)
			sess, err := a.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"})
			if err != nil {
				t.Fatal(err)
			}
			for range 2 { // the gateway reports; a second report changes nothing
				if _, err := a.sessions.ReportRejection(ctx, &credentialsv1.ReportRejectionRequest{Handle: sess.GetHandle(), CredentialVersion: 3, Reason: "wialon error 8"}); err != nil {
					t.Fatal(err)
				}
			}
			// A retried put stores and announces once.
			for range 2 {
				if _, err := a.creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: "acme", CredentialId: "w", RequestId: "put-4",
					Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryToken2, BaseUrl: w.simURL}}}); err != nil {
					t.Fatal(err)
				}
			}
			// The gateway's login is refused: the credentials service records
			// the rejection and announces it; a second mint is refused without
			// asking Wialon, and announces nothing.
			w.sim.RemoveWialonToken(canaryToken2)
			sess4, err := a.sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "w"})
			if err != nil {
				t.Fatal(err)
			}
			resolved, err := a.sessions.ResolveSession(ctx, &credentialsv1.ResolveSessionRequest{Handle: sess4.GetHandle()})
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				_, err := a.sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{Handle: sess4.GetHandle(), CredentialGeneration: resolved.GetCredentialGeneration()})
				wantCode(t, err, codes.FailedPrecondition)
			}
			for range 2 { // a retried delete deletes and announces once
				if _, err := a.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "w", RequestId: "delete-1"}); err != nil {
					t.Fatal(err)
				}
			}

			got := expectEvents(t, acme,
				wantEvent{evCreated, "w", 1}, wantEvent{evRotated, "w", 2}, wantEvent{evRejected, "w", 2},
				wantEvent{evRotated, "w", 3}, wantEvent{evRejected, "w", 3},
				wantEvent{evRotated, "w", 4}, wantEvent{evRejected, "w", 4}, wantEvent{evDeleted, "w", 0})
			if !strings.Contains(got[2].GetMessage(), "rejected") || got[4].GetMessage() != "provider rejected the credential: wialon error 8" ||
				!strings.Contains(got[6].GetMessage(), "rejected") {
				t.Errorf("rejection messages %q, %q, %q", got[2].GetMessage(), got[4].GetMessage(), got[6].GetMessage())
			}
			expectEvents(t, globex, wantEvent{evCreated, "w", 1})

			// Resume after the creation: everything since, from the stream.
			resumed := watchEvents(t, a, "acme", got[0].GetEventId())
			again := expectEvents(t, resumed,
				wantEvent{evRotated, "w", 2}, wantEvent{evRejected, "w", 2}, wantEvent{evRotated, "w", 3}, wantEvent{evRejected, "w", 3},
				wantEvent{evRotated, "w", 4}, wantEvent{evRejected, "w", 4}, wantEvent{evDeleted, "w", 0})
			if again[6].GetEventId() != got[7].GetEventId() {
				t.Errorf("resumed event ids differ: %s vs %s", again[6].GetEventId(), got[7].GetEventId())
			}
			// Nothing more: the retries and the second mint added no event.
			if n := streamLen(t, w, "acme"); n != int64(len(got)) {
				t.Errorf("the tenant's stream holds %d events, want %d", n, len(got))
			}
			w.assertNoLeak(t, nil, canaryToken, canaryToken2, sess.GetHandle(), sess4.GetHandle())
		})
	}
}

// streamLen is how many events tenant's stream holds.
func streamLen(t *testing.T, w *connectWorld, tenant string) int64 {
	t.Helper()
	n, err := w.client.XLen(context.Background(), w.prefix+":{"+tenant+"}:events").Result()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestWatchCredentialEventsNeedsTheTenant: a watcher is authorized for the
// tenant it names.
func TestWatchCredentialEventsNeedsTheTenant(t *testing.T) {
	w := newConnectWorld(t, connectBackends()[2])
	r := w.start(replicaOptions{})
	w.authz.deny(principalAcme, "globex")
	s, err := r.creds.WatchCredentialEvents(as(principalAcme), &credentialsv1.WatchCredentialEventsRequest{TenantId: "globex"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	wantCode(t, err, codes.PermissionDenied)
}

// TestExpiryWarnings: a token entering the warning window gets one EXPIRING
// event however many replicas check, a token far from expiry none, and the
// metrics count the stored credentials by state and expiry.
func TestExpiryWarnings(t *testing.T) {
	for _, be := range connectBackends() {
		t.Run(be.name, func(t *testing.T) {
			w := newConnectWorld(t, be)
			reg := prometheus.NewRegistry()
			a, b := w.start(replicaOptions{registerer: reg}), w.start(replicaOptions{})
			ctx := context.Background()
			watch := watchEvents(t, b, "acme", "")

			connect := func(id string, d time.Duration) {
				t.Helper()
				resp := startAuthorization(t, a, w, "acme", id, d)
				if got := get(t, approveAtWialon(t, resp.GetAuthorizeUrl(), "allow", nil)); got.status != http.StatusSeeOther || !strings.Contains(got.location, "status=connected") {
					t.Fatalf("connect %s: %d %s", id, got.status, got.location)
				}
			}
			connect("soon", 20*24*time.Hour)
			connect("later", 90*24*time.Hour)
			connect("forever", 0)
			expectEvents(t, watch, wantEvent{evCreated, "soon", 1}, wantEvent{evCreated, "later", 1}, wantEvent{evCreated, "forever", 1})

			for _, r := range []*replica{a, b} {
				if err := r.svc.CheckCredentials(ctx); err != nil {
					t.Fatal(err)
				}
			}
			wantGauge(t, reg, "fleetbroker_credentials_stored", map[string]string{"provider": "wialon", "validation_state": "valid"}, 3)
			wantGauge(t, reg, "fleetbroker_credentials_by_token_expiry", map[string]string{"provider": "wialon", "expires_in": "30d"}, 1)
			wantGauge(t, reg, "fleetbroker_credentials_by_token_expiry", map[string]string{"provider": "wialon", "expires_in": "100d"}, 1)
			wantGauge(t, reg, "fleetbroker_credentials_by_token_expiry", map[string]string{"provider": "wialon", "expires_in": "none"}, 1)
			if d := gauge(t, reg, "fleetbroker_credentials_min_days_to_token_expiry", map[string]string{"provider": "wialon"}); d < 19.9 || d > 20 {
				t.Errorf("min days to expiry %v, want 20", d)
			}

			// Seven days on, "soon" is within the 14-day window: both
			// replicas check, one event comes.
			w.clock.Advance(7 * 24 * time.Hour)
			for _, r := range []*replica{a, b, a} {
				if err := r.svc.CheckCredentials(ctx); err != nil {
					t.Fatal(err)
				}
			}
			ev := expectEvents(t, watch, wantEvent{evExpiring, "soon", 1})[0]
			if left := time.Until(ev.GetTokenExpireTime().AsTime()); left < 20*24*time.Hour-time.Minute || left > 20*24*time.Hour {
				t.Errorf("token_expire_time in %v, want the token's", left)
			}
			// Nothing else is pending: a deletion is the next event.
			if _, err := a.creds.DeleteCredential(ctx, &credentialsv1.DeleteCredentialRequest{TenantId: "acme", CredentialId: "forever"}); err != nil {
				t.Fatal(err)
			}
			expectEvents(t, watch, wantEvent{evDeleted, "forever", 0})
			wantGauge(t, reg, "fleetbroker_credentials_by_token_expiry", map[string]string{"provider": "wialon", "expires_in": "7d"}, 0)
			wantGauge(t, reg, "fleetbroker_credentials_by_token_expiry", map[string]string{"provider": "wialon", "expires_in": "30d"}, 1)
		})
	}
}

func gauge(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue metrics
				}
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no %s%v", name, labels)
	return 0
}

func wantGauge(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string, want float64) {
	t.Helper()
	if got := gauge(t, reg, name, labels); got != want {
		t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}
