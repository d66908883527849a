package app_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/gateway"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// syncBuffer collects log output for assertions.
type syncBuffer = testenv.LogBuffer

// The walkthrough RunDev prints once the demo tenant is seeded names the
// bound addresses; with port 0 that is the only place they appear.
var (
	grpcAddrLine = regexp.MustCompile(`gRPC \(credentials, sessions, telematics\):\s+(\S+)`)
	simURLLine   = regexp.MustCompile(`simulator \(Wialon \+ FleetUp\):\s+(\S+)`)
)

// devDemoFleet is the simulator's default fleet size.
const devDemoFleet = 50

// TestRunDev runs `fleetbroker dev` and walks the README's grpcurl
// walkthrough with Go clients, then shuts it down.
func TestRunDev(t *testing.T) {
	out, logs := &syncBuffer{}, &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	go func() {
		runErr <- app.RunDev(ctx, app.DevConfig{
			Listen:          "127.0.0.1:0",
			SimulatorListen: "127.0.0.1:0",
			Reflection:      true,
			FleetUpRate:     50,
		}, out, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	}()
	returned := false
	t.Cleanup(func() {
		if !returned {
			cancel()
			select {
			case <-runErr:
			case <-time.After(30 * time.Second):
				t.Error("RunDev did not return after the test")
			}
		}
	})

	grpcAddr, simURL := waitReady(t, out, runErr, time.Minute)
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", grpcAddr, err)
	}
	defer conn.Close()

	t.Run("banner", func(t *testing.T) {
		if !strings.Contains(out.String(), "DEVELOPMENT MODE. NOT FOR PRODUCTION.") {
			t.Errorf("no development-mode banner in:\n%s", out.String())
		}
	})

	t.Run("reflection lists the services", func(t *testing.T) {
		services, err := listServices(callCtx(t, 10*time.Second), conn)
		if err != nil {
			t.Fatalf("ListServices: %v", err)
		}
		for _, want := range []string{
			"fleetbroker.credentials.v1.CredentialService",
			"fleetbroker.credentials.v1.SessionService",
			"fleetbroker.telematics.v1.TelematicsService",
			"grpc.health.v1.Health",
		} {
			if !slices.Contains(services, want) {
				t.Errorf("ListServices = %v, missing %s", services, want)
			}
		}
	})

	t.Run("health", func(t *testing.T) {
		resp, err := healthpb.NewHealthClient(conn).Check(callCtx(t, 10*time.Second), &healthpb.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health Check = %v, %v; want SERVING", resp.GetStatus(), err)
		}
	})

	t.Run("simulator stats", func(t *testing.T) {
		req, err := http.NewRequestWithContext(callCtx(t, 10*time.Second), http.MethodGet, simURL+"/sim/stats", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET %s/sim/stats: %v", simURL, err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s/sim/stats = %s, want 200", simURL, resp.Status)
		}
	})

	t.Run("demo credentials are listed", func(t *testing.T) {
		resp, err := credentialsv1.NewCredentialServiceClient(conn).ListCredentials(callCtx(t, 10*time.Second),
			&credentialsv1.ListCredentialsRequest{TenantId: app.DemoTenant})
		if err != nil {
			t.Fatalf("ListCredentials: %v", err)
		}
		want := map[string]credentialsv1.Provider{
			app.DemoWialonCredential:  credentialsv1.Provider_PROVIDER_WIALON,
			app.DemoFleetUpCredential: credentialsv1.Provider_PROVIDER_FLEETUP,
		}
		got := map[string]credentialsv1.Provider{}
		for _, c := range resp.GetCredentials() {
			got[c.GetCredentialId()] = c.GetProvider()
			// Seeded through the public API, so validated against the simulator.
			if c.GetValidationState() != credentialsv1.ValidationState_VALIDATION_STATE_VALID {
				t.Errorf("%s: validation_state = %v, want VALID", c.GetCredentialId(), c.GetValidationState())
			}
			if c.GetBaseUrl() != simURL {
				t.Errorf("%s: base_url = %q, want the simulator %q", c.GetCredentialId(), c.GetBaseUrl(), simURL)
			}
		}
		for id, provider := range want {
			if got[id] != provider {
				t.Errorf("credential %s: provider %v, want %v (listed: %v)", id, got[id], provider, got)
			}
		}
	})

	var (
		handlesMu sync.Mutex
		handles   []string
	)
	t.Run("gateway", func(t *testing.T) {
		tests := []struct {
			credentialID string
			provider     telematicsv1.Provider
		}{
			{app.DemoWialonCredential, telematicsv1.Provider_PROVIDER_WIALON},
			{app.DemoFleetUpCredential, telematicsv1.Provider_PROVIDER_FLEETUP},
		}
		for _, tt := range tests {
			t.Run(tt.credentialID, func(t *testing.T) {
				t.Parallel() // each waits out a handle cache TTL
				sessions := credentialsv1.NewSessionServiceClient(conn)
				telematics := telematicsv1.NewTelematicsServiceClient(conn)

				issued, err := sessions.IssueSession(callCtx(t, 10*time.Second), &credentialsv1.IssueSessionRequest{
					TenantId: app.DemoTenant, CredentialId: tt.credentialID, Ttl: durationpb.New(10 * time.Minute),
					Scopes: []credentialsv1.Scope{credentialsv1.Scope_SCOPE_READ},
				})
				if err != nil {
					t.Fatalf("IssueSession: %v", err)
				}
				handle := issued.GetHandle()
				if !strings.HasPrefix(handle, "fbs_") {
					t.Fatalf("handle %q lacks the fbs_ prefix", handle)
				}
				handlesMu.Lock()
				handles = append(handles, handle)
				handlesMu.Unlock()
				authed := func(ctx context.Context) context.Context {
					return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+handle)
				}

				units, err := telematics.ListUnits(authed(callCtx(t, 30*time.Second)), &telematicsv1.ListUnitsRequest{})
				if err != nil {
					t.Fatalf("ListUnits: %v", err)
				}
				if n := len(units.GetUnits()); n != devDemoFleet || units.GetNextPageToken() != "" {
					t.Errorf("ListUnits = %d units (next page %q), want the %d-unit demo fleet on one page",
						n, units.GetNextPageToken(), devDemoFleet)
				}
				for _, u := range units.GetUnits() {
					if u.GetProvider() != tt.provider || u.GetUnitId() == "" {
						t.Errorf("unit %v: want provider %v and an id", u, tt.provider)
						break
					}
				}

				watchCtx, stopWatch := context.WithTimeout(authed(context.Background()), 30*time.Second)
				defer stopWatch()
				watch, err := telematics.WatchPositions(watchCtx, &telematicsv1.WatchPositionsRequest{MinInterval: durationpb.New(time.Second)})
				if err != nil {
					t.Fatalf("WatchPositions: %v", err)
				}
				msg, err := watch.Recv()
				if err != nil {
					t.Fatalf("WatchPositions first message: %v", err)
				}
				if len(msg.GetPositions()) == 0 {
					t.Errorf("the first WatchPositions message has no positions")
				}
				stopWatch()

				if _, err := sessions.RevokeSession(callCtx(t, 10*time.Second), &credentialsv1.RevokeSessionRequest{Handle: handle}); err != nil {
					t.Fatalf("RevokeSession: %v", err)
				}
				revoked := time.Now()
				// A resolution may be reused for the handle cache TTL, no longer.
				// The slack covers a slow machine.
				deadline := revoked.Add(gateway.DefaultHandleCacheTTL + 2*time.Second)
				for {
					ctx, cancel := context.WithTimeout(authed(context.Background()), 10*time.Second)
					_, err := telematics.ListUnits(ctx, &telematicsv1.ListUnitsRequest{PageSize: 1})
					cancel()
					if status.Code(err) == codes.Unauthenticated {
						t.Logf("revoked handle refused after %s", time.Since(revoked).Round(time.Millisecond))
						break
					}
					if err != nil {
						t.Fatalf("ListUnits with a revoked handle = %v, want Unauthenticated", err)
					}
					if time.Now().After(deadline) {
						t.Fatalf("the revoked handle still works %s after RevokeSession", time.Since(revoked))
					}
					time.Sleep(100 * time.Millisecond)
				}
			})
		}
	})

	// Graceful shutdown: RunDev returns nil promptly once ctx is cancelled.
	cancel()
	select {
	case err := <-runErr:
		returned = true
		if err != nil {
			t.Errorf("RunDev = %v, want nil after cancellation", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("RunDev did not return within 5s of cancellation")
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx2, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("health Check after shutdown = %v, want Unavailable", err)
	}

	// No secret reached the logs or the printed walkthrough: neither the
	// demo secrets nor the issued handles.
	secrets := map[string]string{
		"wialon token":    simulator.DemoWialonToken,
		"fleetup api key": simulator.DemoFleetUpAPIKey,
		"fleetup secret":  simulator.DemoFleetUpSecret,
	}
	for i, h := range handles {
		secrets[fmt.Sprintf("handle %d", i)] = h
	}
	for name, secret := range secrets {
		for where, text := range map[string]string{"logs": logs.String(), "output": out.String()} {
			if strings.Contains(text, secret) {
				t.Errorf("the %s appears in the %s", name, where)
			}
		}
	}
}

// waitReady waits until RunDev has printed its walkthrough and returns the
// gRPC address and simulator URL it names.
func waitReady(t *testing.T, out *syncBuffer, runErr <-chan error, timeout time.Duration) (grpcAddr, simURL string) {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(out.String(), "is ready") {
		select {
		case err := <-runErr:
			t.Fatalf("RunDev returned before it was ready: %v\noutput:\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("RunDev not ready after %s; output:\n%s", timeout, out.String())
		case <-tick.C:
		}
	}
	text := out.String()
	g, s := grpcAddrLine.FindStringSubmatch(text), simURLLine.FindStringSubmatch(text)
	if g == nil || s == nil {
		t.Fatalf("cannot find the gRPC address and simulator URL in:\n%s", text)
	}
	return g[1], s[1]
}

func callCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// listServices asks the grpc.reflection.v1 service for the service names,
// as `grpcurl list` does.
func listServices(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	defer stream.CloseSend()
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: "*"},
	}); err != nil && !errors.Is(err, io.EOF) { // io.EOF: the status comes from Recv
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if e := resp.GetErrorResponse(); e != nil {
		return nil, status.Error(codes.Code(e.GetErrorCode()), e.GetErrorMessage())
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}
