package app_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

var authURLLine = regexp.MustCompile(`Wialon authorization callback:\s+(\S+)`)

// TestDevConnectsWialon walks the README's connect walkthrough against
// `fleetbroker dev`, as `curl -L` does: start the flow over gRPC, approve
// on the simulator's login.html, follow the redirects through the callback
// to dev's return page; the credential is then stored, validated, usable
// through the gateway, announced on the event stream, and its token is in
// no log line.
func TestDevConnectsWialon(t *testing.T) {
	out, logs := &syncBuffer{}, &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() {
		runErr <- app.RunDev(ctx, app.DevConfig{
			Listen: "127.0.0.1:0", SimulatorListen: "127.0.0.1:0", AuthorizeListen: "127.0.0.1:0",
			FleetUpRate: 50,
		}, out, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-runErr:
		case <-time.After(30 * time.Second):
			t.Error("RunDev did not return")
		}
	})
	grpcAddr, simURL := waitReady(t, out, runErr, time.Minute)
	m := authURLLine.FindStringSubmatch(out.String()) // printed with the rest of the walkthrough
	if m == nil {
		t.Fatalf("no callback URL in:\n%s", out)
	}
	authURL := m[1]
	if !strings.HasPrefix(authURL, "http://127.0.0.1:") {
		t.Fatalf("callback URL %q", authURL)
	}
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	creds := credentialsv1.NewCredentialServiceClient(conn)
	watch, err := creds.WatchCredentialEvents(callCtx(t, time.Minute), &credentialsv1.WatchCredentialEventsRequest{TenantId: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Header(); err != nil {
		t.Fatal(err)
	}

	resp, err := creds.StartWialonAuthorization(callCtx(t, 10*time.Second), &credentialsv1.StartWialonAuthorizationRequest{
		TenantId: "acme", CredentialId: "wialon-main", BaseUrl: simURL, ReturnUrl: authURL + "/dev/return", Duration: durationpb.New(24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	// curl -sL -d action=allow -d login=demo "$URL"
	var hops []string
	var token string // what Wialon (the simulator) sent the callback
	browser := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(req *http.Request, _ []*http.Request) error {
		hops = append(hops, req.URL.Scheme+"://"+req.URL.Host+req.URL.Path)
		if tok := req.URL.Query().Get("access_token"); tok != "" {
			token = tok
		}
		return nil
	}}
	page, err := browser.PostForm(resp.GetAuthorizeUrl(), url.Values{"action": {"allow"}, "login": {"demo"}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(page.Body)
	page.Body.Close()
	if page.StatusCode != http.StatusOK || !strings.Contains(string(body), "Wialon connection: connected") ||
		page.Request.URL.Query().Get("status") != "connected" || page.Request.URL.Query().Get("credential_id") != "wialon-main" {
		t.Fatalf("ended at %s: %d %s", page.Request.URL, page.StatusCode, body)
	}
	if len(hops) != 2 || !strings.HasPrefix(hops[0], authURL+"/wialon/callback/") || hops[1] != authURL+"/dev/return" {
		t.Errorf("redirects %v, want the callback then the return page", hops)
	}

	got, err := creds.GetCredential(callCtx(t, 10*time.Second), &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "wialon-main"})
	if err != nil || got.GetCredential().GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID ||
		got.GetCredential().GetUpstreamUser() != "demo" || got.GetCredential().GetTokenExpireTime() == nil {
		t.Fatalf("GetCredential = %v, %v", got, err)
	}
	ev, err := watch.Recv()
	if err != nil || ev.GetEvent().GetType() != credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_CREATED {
		t.Fatalf("event %v, %v", ev, err)
	}
	sess, err := credentialsv1.NewSessionServiceClient(conn).IssueSession(callCtx(t, 10*time.Second), &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "wialon-main"})
	if err != nil {
		t.Fatal(err)
	}
	units, err := telematicsv1.NewTelematicsServiceClient(conn).ListUnits(metadata.AppendToOutgoingContext(callCtx(t, 10*time.Second), "authorization", "Bearer "+sess.GetHandle()), &telematicsv1.ListUnitsRequest{PageSize: 2})
	if err != nil || len(units.GetUnits()) != 2 {
		t.Fatalf("ListUnits with the connected credential: %v, %v", units, err)
	}
	if len(token) != 72 || strings.Contains(logs.String(), token) || strings.Contains(out.String(), token) {
		t.Errorf("the token (%d characters) is in dev's logs or output", len(token))
	}
}
