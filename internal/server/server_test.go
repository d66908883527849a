package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
)

// canary marks values that must never reach a log line, a status message or
// a status detail. It is alphanumeric so it fits every string rule it is
// put into (a Wialon token is ^[A-Za-z0-9]*$).
const canary = "CanaryQ7vXk2"

// canaryString is an alphanumeric string of exactly n characters starting
// with the canary.
func canaryString(n int) string {
	return (canary + strings.Repeat("z", n))[:n]
}

var (
	credentialService = credentialsv1.CredentialService_ServiceDesc.ServiceName
	sessionService    = credentialsv1.SessionService_ServiceDesc.ServiceName
	telematicsService = telematicsv1.TelematicsService_ServiceDesc.ServiceName
	healthService     = healthpb.Health_ServiceDesc.ServiceName
)

// hook decides what a fake RPC does: nil lets it succeed, a returned error is
// the RPC's error, and it may block or panic.
type hook func(ctx context.Context, method string) error

// fakes implements a few RPCs of the real contracts, so requests carry real
// protovalidate rules. Every call is counted and passed to hook.
type fakes struct {
	calls atomic.Int32
	hook  hook
}

func (f *fakes) call(ctx context.Context, method string) error {
	f.calls.Add(1)
	if f.hook == nil {
		return nil
	}
	return f.hook(ctx, method)
}

func (f *fakes) register(s *grpc.Server) {
	credentialsv1.RegisterCredentialServiceServer(s, &fakeCredentials{f: f})
	credentialsv1.RegisterSessionServiceServer(s, &fakeSessions{f: f})
	telematicsv1.RegisterTelematicsServiceServer(s, &fakeTelematics{f: f})
}

type fakeCredentials struct {
	credentialsv1.UnimplementedCredentialServiceServer
	f *fakes
}

func (c *fakeCredentials) PutCredential(ctx context.Context, req *credentialsv1.PutCredentialRequest) (*credentialsv1.PutCredentialResponse, error) {
	if err := c.f.call(ctx, "PutCredential"); err != nil {
		return nil, err
	}
	return &credentialsv1.PutCredentialResponse{Credential: &credentialsv1.Credential{TenantId: req.GetTenantId(), CredentialId: req.GetCredentialId()}}, nil
}

func (c *fakeCredentials) GetCredential(ctx context.Context, req *credentialsv1.GetCredentialRequest) (*credentialsv1.GetCredentialResponse, error) {
	if err := c.f.call(ctx, "GetCredential"); err != nil {
		return nil, err
	}
	return &credentialsv1.GetCredentialResponse{Credential: &credentialsv1.Credential{TenantId: req.GetTenantId(), CredentialId: req.GetCredentialId()}}, nil
}

type fakeSessions struct {
	credentialsv1.UnimplementedSessionServiceServer
	f *fakes
}

func (s *fakeSessions) IssueSession(ctx context.Context, _ *credentialsv1.IssueSessionRequest) (*credentialsv1.IssueSessionResponse, error) {
	if err := s.f.call(ctx, "IssueSession"); err != nil {
		return nil, err
	}
	return &credentialsv1.IssueSessionResponse{SessionId: "ses_test"}, nil
}

type fakeTelematics struct {
	telematicsv1.UnimplementedTelematicsServiceServer
	f *fakes
}

// WatchPositions sends one message, then ends the stream.
func (t *fakeTelematics) WatchPositions(req *telematicsv1.WatchPositionsRequest, stream grpc.ServerStreamingServer[telematicsv1.WatchPositionsResponse]) error {
	if err := t.f.call(stream.Context(), "WatchPositions"); err != nil {
		return err
	}
	return stream.Send(&telematicsv1.WatchPositionsResponse{Positions: []*telematicsv1.Position{{UnitId: "unit-1"}}})
}

// syncBuffer collects log output for assertions.
type syncBuffer = testenv.LogBuffer

// testServer is a server.Server serving the fakes on a bufconn listener.
type testServer struct {
	lis    *bufconn.Listener
	fakes  *fakes
	logs   *syncBuffer
	conn   *grpc.ClientConn
	cancel context.CancelFunc
	// stopped is closed when ServeListener has returned serveErr.
	stopped  chan struct{}
	serveErr error
}

// startServer serves cfg (its Logger replaced by one writing JSON at debug
// level into ts.logs, so anything logged at any level is captured) until the
// test ends.
func startServer(t *testing.T, cfg server.Config, h hook) *testServer {
	t.Helper()
	ts := &testServer{
		lis:     bufconn.Listen(1 << 20),
		fakes:   &fakes{hook: h},
		logs:    &syncBuffer{},
		stopped: make(chan struct{}),
	}
	cfg.Insecure = true // bufconn: no TLS to terminate
	cfg.Logger = slog.New(slog.NewJSONHandler(ts.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := server.New(cfg, ts.fakes.register)
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts.cancel = cancel
	go func() {
		defer close(ts.stopped)
		ts.serveErr = srv.ServeListener(ctx, ts.lis)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ts.stopped:
		case <-time.After(cfg.GracePeriod + 10*time.Second):
			t.Errorf("ServeListener did not return after the test")
		}
	})
	ts.conn = ts.dial(t)
	return ts
}

// dial returns a new client connection to the server.
func (ts *testServer) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return ts.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// waitStopped waits up to d for ServeListener to return and returns its error.
func (ts *testServer) waitStopped(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case <-ts.stopped:
		return ts.serveErr
	case <-time.After(d):
		t.Fatalf("ServeListener did not return within %s", d)
		return nil
	}
}

// logLines parses the captured JSON log lines.
func (ts *testServer) logLines(t *testing.T) []map[string]any {
	t.Helper()
	var lines []map[string]any
	for line := range strings.SplitSeq(strings.TrimSpace(ts.logs.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON: %q: %v", line, err)
		}
		lines = append(lines, m)
	}
	return lines
}

// assertCallLogged fails unless exactly one log line records a finished
// call of service/method, with code. The interceptor logs before the status
// reaches the client, so no waiting is needed.
func (ts *testServer) assertCallLogged(t *testing.T, service, method string, code codes.Code) {
	t.Helper()
	var found int
	for _, line := range ts.logLines(t) {
		if line["grpc.service"] == service && line["grpc.method"] == method {
			found++
			if line["grpc.code"] != code.String() {
				t.Errorf("logged grpc.code = %v, want %v: %v", line["grpc.code"], code, line)
			}
		}
	}
	if found != 1 {
		t.Errorf("%d log lines for %s/%s, want 1:\n%s", found, service, method, ts.logs.String())
	}
}

// assertNoCanary fails if the canary was logged.
func (ts *testServer) assertNoCanary(t *testing.T) {
	t.Helper()
	if strings.Contains(ts.logs.String(), canary) {
		t.Errorf("canary value found in the logs:\n%s", ts.logs.String())
	}
}

func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// recvErr receives from a stream until it ends and returns its error (nil
// for a clean end).
func recvErr[T any](stream grpc.ServerStreamingClient[T]) error {
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func watchOnce(ctx context.Context, conn *grpc.ClientConn, req *telematicsv1.WatchPositionsRequest) error {
	stream, err := telematicsv1.NewTelematicsServiceClient(conn).WatchPositions(ctx, req)
	if err != nil {
		return err
	}
	return recvErr(stream)
}

func validPut() *credentialsv1.PutCredentialRequest {
	return &credentialsv1.PutCredentialRequest{
		TenantId: "acme", CredentialId: "wialon-main",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canaryString(72)}},
	}
}

func TestHealthServingForEveryService(t *testing.T) {
	ts := startServer(t, server.Config{Reflection: true}, nil)
	client := healthpb.NewHealthClient(ts.conn)
	tests := []struct {
		service string
		want    healthpb.HealthCheckResponse_ServingStatus
	}{
		{"", healthpb.HealthCheckResponse_SERVING},
		{credentialService, healthpb.HealthCheckResponse_SERVING},
		{sessionService, healthpb.HealthCheckResponse_SERVING},
		{telematicsService, healthpb.HealthCheckResponse_SERVING},
		{healthService, healthpb.HealthCheckResponse_SERVING},
		{reflectionpb.ServerReflection_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING},
		{server.LivenessService, healthpb.HealthCheckResponse_SERVING},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("service=%q", tt.service), func(t *testing.T) {
			resp, err := client.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: tt.service})
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if resp.GetStatus() != tt.want {
				t.Errorf("status = %v, want %v", resp.GetStatus(), tt.want)
			}
		})
	}
	t.Run("unknown service", func(t *testing.T) {
		_, err := client.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: "no.such.Service"})
		if status.Code(err) != codes.NotFound {
			t.Errorf("Check(unknown) = %v, want NotFound", err)
		}
	})
}

// TestShutdownDrains: cancelling the serve context turns health to
// NOT_SERVING, refuses new calls, lets a call already in flight finish
// successfully, and then returns nil without waiting for the grace period.
func TestShutdownDrains(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	ts := startServer(t, server.Config{GracePeriod: time.Minute}, func(ctx context.Context, method string) error {
		if method != "GetCredential" {
			return nil
		}
		close(entered)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	})

	// A health watcher, as a load balancer would hold.
	watchCtx, stopWatch := context.WithTimeout(context.Background(), 30*time.Second)
	defer stopWatch()
	watch, err := healthpb.NewHealthClient(ts.conn).Watch(watchCtx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	if msg, err := watch.Recv(); err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first health status = %v, %v; want SERVING", msg.GetStatus(), err)
	}

	type result struct {
		resp *credentialsv1.GetCredentialResponse
		err  error
	}
	inflight := make(chan result, 1)
	go func() {
		resp, err := credentialsv1.NewCredentialServiceClient(ts.conn).GetCredential(callCtx(t),
			&credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "in-flight"})
		inflight <- result{resp, err}
	}()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the in-flight call never reached its handler")
	}

	ts.cancel()

	if msg, err := watch.Recv(); err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health status after cancel = %v, %v; want NOT_SERVING", msg.GetStatus(), err)
	}
	// The watcher lets go, as a load balancer does once told NOT_SERVING;
	// a stream left open would hold the drain like any other call.
	stopWatch()

	// New calls are refused, on the existing connection and on a new one.
	fresh := ts.dial(t)
	for name, conn := range map[string]*grpc.ClientConn{"existing connection": ts.conn, "new connection": fresh} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
			cancel()
			if status.Code(err) == codes.Unavailable {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: a new call during the drain got %v, want Unavailable", name, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	select {
	case r := <-inflight:
		t.Fatalf("the in-flight call ended before its handler was released: %v", r.err)
	case <-ts.stopped:
		t.Fatalf("ServeListener returned (%v) while a call was in flight", ts.serveErr)
	default:
	}

	close(release)
	select {
	case r := <-inflight:
		if r.err != nil {
			t.Fatalf("in-flight call failed: %v", r.err)
		}
		if got := r.resp.GetCredential().GetCredentialId(); got != "in-flight" {
			t.Errorf("in-flight response credential_id = %q, want %q", got, "in-flight")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the in-flight call did not finish after release")
	}
	if err := ts.waitStopped(t, 10*time.Second); err != nil {
		t.Errorf("ServeListener = %v, want nil", err)
	}
	if strings.Contains(ts.logs.String(), "grace period over") {
		t.Errorf("a drain that finished in time logged the grace-period cut-off:\n%s", ts.logs.String())
	}
}

// TestShutdownGracePeriod: a call that outlives the grace period is cut off
// and ServeListener returns about one grace period after cancellation.
func TestShutdownGracePeriod(t *testing.T) {
	const grace = 300 * time.Millisecond
	tests := []struct {
		name  string
		block func(ctx context.Context, release <-chan struct{})
	}{
		{"handler ignores its context", func(_ context.Context, release <-chan struct{}) { <-release }},
		{"handler waits for its context", func(ctx context.Context, release <-chan struct{}) {
			select {
			case <-ctx.Done():
			case <-release:
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entered := make(chan struct{}, 1)
			release := make(chan struct{})
			t.Cleanup(func() { close(release) }) // after the server's cleanup: let the handler goroutine end
			ts := startServer(t, server.Config{GracePeriod: grace}, func(ctx context.Context, _ string) error {
				entered <- struct{}{}
				tt.block(ctx, release)
				return nil
			})
			inflight := make(chan error, 1)
			go func() {
				_, err := credentialsv1.NewCredentialServiceClient(ts.conn).GetCredential(callCtx(t),
					&credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "slow"})
				inflight <- err
			}()
			select {
			case <-entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the call never reached its handler")
			}

			start := time.Now()
			ts.cancel()
			if err := ts.waitStopped(t, grace+5*time.Second); err != nil {
				t.Errorf("ServeListener = %v, want nil", err)
			}
			if elapsed := time.Since(start); elapsed < grace {
				t.Errorf("ServeListener returned after %s, before the %s grace period", elapsed, grace)
			}
			select {
			case err := <-inflight:
				if status.Code(err) != codes.Unavailable {
					t.Errorf("cut-off call = %v, want Unavailable", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("the cut-off call did not end")
			}
			if !strings.Contains(ts.logs.String(), "grace period over") {
				t.Errorf("no grace-period warning logged:\n%s", ts.logs.String())
			}
		})
	}
}

func TestReflection(t *testing.T) {
	tests := []struct {
		reflection bool
		wantCode   codes.Code
	}{
		{reflection: true, wantCode: codes.OK},
		{reflection: false, wantCode: codes.Unimplemented},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("reflection=%v", tt.reflection), func(t *testing.T) {
			ts := startServer(t, server.Config{Reflection: tt.reflection}, nil)
			services, err := listServices(callCtx(t), ts.conn)
			if status.Code(err) != tt.wantCode {
				t.Fatalf("ListServices = %v, %v; want code %v", services, err, tt.wantCode)
			}
			if err != nil {
				return
			}
			for _, want := range []string{credentialService, sessionService, telematicsService, healthService,
				reflectionpb.ServerReflection_ServiceDesc.ServiceName} {
				if !slices.Contains(services, want) {
					t.Errorf("ListServices = %v, missing %s", services, want)
				}
			}
		})
	}
}

// listServices asks the grpc.reflection.v1 service for the service names.
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

func TestValidation(t *testing.T) {
	ts := startServer(t, server.Config{}, nil)
	creds := credentialsv1.NewCredentialServiceClient(ts.conn)
	sessions := credentialsv1.NewSessionServiceClient(ts.conn)
	tests := []struct {
		name      string
		call      func(ctx context.Context) error
		wantField string
	}{
		{"71-character wialon token", func(ctx context.Context) error {
			req := validPut()
			req.GetWialon().Token = canaryString(71)
			_, err := creds.PutCredential(ctx, req)
			return err
		}, "wialon.token"},
		{"empty tenant", func(ctx context.Context) error {
			req := validPut() // the token is valid and carries the canary
			req.TenantId = ""
			_, err := creds.PutCredential(ctx, req)
			return err
		}, "tenant_id"},
		{"tenant breaking the pattern", func(ctx context.Context) error {
			req := validPut()
			req.TenantId = "-" + canary
			_, err := creds.PutCredential(ctx, req)
			return err
		}, "tenant_id"},
		{"fleetup secret too long", func(ctx context.Context) error {
			_, err := creds.PutCredential(ctx, &credentialsv1.PutCredentialRequest{
				TenantId: "acme", CredentialId: "fleetup-main",
				Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
					ApiKey: canary + "-key", AccountId: 12345, Secret: canaryString(1025)}},
			})
			return err
		}, "fleetup.secret"},
		{"session ttl below one second", func(ctx context.Context) error {
			_, err := sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{
				TenantId: "acme", CredentialId: canary, Ttl: durationpb.New(500 * time.Millisecond)})
			return err
		}, "ttl"},
		{"stream: unit id too long", func(ctx context.Context) error {
			return watchOnce(ctx, ts.conn, &telematicsv1.WatchPositionsRequest{UnitIds: []string{canaryString(65)}})
		}, "unit_ids[0]"},
		{"stream: min interval below one second", func(ctx context.Context) error {
			return watchOnce(ctx, ts.conn, &telematicsv1.WatchPositionsRequest{
				UnitIds: []string{canary}, MinInterval: durationpb.New(500 * time.Millisecond)})
		}, "min_interval"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := ts.fakes.calls.Load()
			err := tt.call(callCtx(t))
			st := status.Convert(err)
			if st.Code() != codes.InvalidArgument {
				t.Fatalf("code = %v (%v), want InvalidArgument", st.Code(), err)
			}
			if got := ts.fakes.calls.Load(); got != before {
				t.Errorf("the handler ran for an invalid request")
			}
			var fields []string
			var info *errdetails.ErrorInfo
			for _, d := range st.Details() {
				switch d := d.(type) {
				case *errdetails.BadRequest:
					for _, v := range d.GetFieldViolations() {
						fields = append(fields, v.GetField())
					}
				case *errdetails.ErrorInfo:
					info = d
				}
			}
			if !slices.Contains(fields, tt.wantField) {
				t.Errorf("BadRequest field violations = %q, want %q", fields, tt.wantField)
			}
			if !strings.Contains(st.Message(), tt.wantField) {
				t.Errorf("status message %q does not name %q", st.Message(), tt.wantField)
			}
			if info.GetReason() != apierr.ReasonInvalidArgument || info.GetDomain() != apierr.Domain {
				t.Errorf("ErrorInfo = %v, want reason %s in domain %s", info, apierr.ReasonInvalidArgument, apierr.Domain)
			}
			// Message and details, exactly as sent on the wire.
			wire, mErr := proto.Marshal(st.Proto())
			if mErr != nil {
				t.Fatal(mErr)
			}
			if strings.Contains(st.Message(), canary) || bytes.Contains(wire, []byte(canary)) {
				t.Errorf("the rejected value is echoed in the status: %v", st.Proto())
			}
			ts.assertNoCanary(t)
		})
	}
}

func TestRecovery(t *testing.T) {
	ts := startServer(t, server.Config{}, func(_ context.Context, method string) error {
		switch method {
		case "PutCredential":
			panic("boom: " + canary)
		case "IssueSession":
			panic(fmt.Errorf("wrapped: %w", errors.New(canary)))
		case "WatchPositions":
			panic(canary)
		}
		return nil
	})
	creds := credentialsv1.NewCredentialServiceClient(ts.conn)
	sessions := credentialsv1.NewSessionServiceClient(ts.conn)
	tests := []struct {
		name    string
		call    func(ctx context.Context) error
		service string
		method  string
	}{
		{"unary, string panic", func(ctx context.Context) error {
			_, err := creds.PutCredential(ctx, validPut())
			return err
		}, credentialService, "PutCredential"},
		{"unary, error panic", func(ctx context.Context) error {
			_, err := sessions.IssueSession(ctx, &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "c"})
			return err
		}, sessionService, "IssueSession"},
		{"server stream", func(ctx context.Context) error {
			return watchOnce(ctx, ts.conn, &telematicsv1.WatchPositionsRequest{})
		}, telematicsService, "WatchPositions"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call(callCtx(t))
			st := status.Convert(err)
			if st.Code() != codes.Internal {
				t.Fatalf("code = %v (%v), want Internal", st.Code(), err)
			}
			if wire, _ := proto.Marshal(st.Proto()); bytes.Contains(wire, []byte(canary)) {
				t.Errorf("the panic value is in the status: %v", st.Proto())
			}
			// The server keeps serving.
			resp, err := creds.GetCredential(callCtx(t), &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "after-panic"})
			if err != nil || resp.GetCredential().GetCredentialId() != "after-panic" {
				t.Fatalf("call after the panic = %v, %v; want success", resp, err)
			}
			if !strings.Contains(ts.logs.String(), "panic in handler") {
				t.Errorf("the panic was not logged:\n%s", ts.logs.String())
			}
			// Like every call, the panicked one is logged with its method and code.
			ts.assertCallLogged(t, tt.service, tt.method, codes.Internal)
			ts.assertNoCanary(t)
		})
	}
}

// TestLogging: every finished call is logged once with its method and code,
// and no request payload is.
func TestLogging(t *testing.T) {
	ts := startServer(t, server.Config{}, func(_ context.Context, method string) error {
		if method == "GetCredential" {
			return apierr.New(codes.NotFound, apierr.ReasonCredentialNotFound, "credential not found", nil)
		}
		return nil
	})
	creds := credentialsv1.NewCredentialServiceClient(ts.conn)
	tests := []struct {
		name     string
		call     func(ctx context.Context) error
		service  string
		method   string
		wantCode codes.Code
	}{
		{"unary success", func(ctx context.Context) error {
			_, err := creds.PutCredential(ctx, validPut())
			return err
		}, credentialService, "PutCredential", codes.OK},
		{"unary error", func(ctx context.Context) error {
			_, err := creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: canary})
			return err
		}, credentialService, "GetCredential", codes.NotFound},
		{"invalid request", func(ctx context.Context) error {
			_, err := credentialsv1.NewSessionServiceClient(ts.conn).IssueSession(ctx, &credentialsv1.IssueSessionRequest{CredentialId: canary})
			return err
		}, sessionService, "IssueSession", codes.InvalidArgument},
		{"server stream", func(ctx context.Context) error {
			return watchOnce(ctx, ts.conn, &telematicsv1.WatchPositionsRequest{UnitIds: []string{canary}})
		}, telematicsService, "WatchPositions", codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(callCtx(t)); status.Code(err) != tt.wantCode {
				t.Fatalf("call = %v, want code %v", err, tt.wantCode)
			}
			ts.assertCallLogged(t, tt.service, tt.method, tt.wantCode)
			ts.assertNoCanary(t)
		})
	}
	t.Run("health checks are not logged", func(t *testing.T) {
		if _, err := healthpb.NewHealthClient(ts.conn).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(ts.logs.String(), healthpb.Health_ServiceDesc.ServiceName) {
			t.Fatal("a health check was logged; probes would drown the call log")
		}
	})
}

// waitHealth polls until every service reports want, or fails the test.
func waitHealth(t *testing.T, conn *grpc.ClientConn, want healthpb.HealthCheckResponse_ServingStatus, services ...string) {
	t.Helper()
	client := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(10 * time.Second)
	for _, svc := range services {
		for {
			resp, err := client.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: svc})
			if err == nil && resp.GetStatus() == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("health of %q = %v, %v; want %v", svc, resp.GetStatus(), err, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// gatherValue returns the value of the one series of name whose labels
// include want, or fails the test.
func gatherValue(t *testing.T, m *telemetry.Metrics, name string, want map[string]string) float64 {
	t.Helper()
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, s := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue series
				}
			}
			switch {
			case s.GetCounter() != nil:
				return s.GetCounter().GetValue()
			case s.GetGauge() != nil:
				return s.GetGauge().GetValue()
			case s.GetHistogram() != nil:
				return float64(s.GetHistogram().GetSampleCount())
			}
		}
	}
	t.Fatalf("no series %s%v", name, want)
	return 0
}

// TestReadinessFlipsHealth: with readiness checks, every service and ""
// report NOT_SERVING until the checks first pass, NOT_SERVING while one
// fails, and SERVING again once it passes.
func TestReadinessFlipsHealth(t *testing.T) {
	var failing atomic.Bool
	firstRun := make(chan struct{})
	check := server.Check{Name: "redis", Check: func(ctx context.Context) error {
		select {
		case <-firstRun:
		case <-ctx.Done():
			return ctx.Err()
		}
		if failing.Load() {
			return errors.New("dial tcp 127.0.0.1:6379: connection refused")
		}
		return nil
	}}
	m := telemetry.NewMetrics()
	ts := startServer(t, server.Config{
		Reflection: true, Metrics: m,
		Readiness:         []server.Check{{Name: "vault", Check: func(context.Context) error { return nil }}, check},
		ReadinessInterval: 20 * time.Millisecond, ReadinessTimeout: 10 * time.Second,
	}, nil)
	all := []string{"", credentialService, sessionService, telematicsService, healthService}

	// The first run is held: the server has not checked its dependencies yet.
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_NOT_SERVING, all...)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, server.LivenessService)

	close(firstRun)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, all...)
	if v := gatherValue(t, m, "fleetbroker_readiness_check_passing", map[string]string{"check": "redis"}); v != 1 {
		t.Errorf("readiness gauge of redis = %v, want 1", v)
	}

	failing.Store(true)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_NOT_SERVING, all...)
	// Liveness is not readiness: a Redis outage must not restart the pod.
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, server.LivenessService)
	if v := gatherValue(t, m, "fleetbroker_readiness_check_passing", map[string]string{"check": "redis"}); v != 0 {
		t.Errorf("readiness gauge of redis = %v, want 0", v)
	}
	if v := gatherValue(t, m, "fleetbroker_readiness_check_passing", map[string]string{"check": "vault"}); v != 1 {
		t.Errorf("readiness gauge of vault = %v, want 1", v)
	}
	// Calls are still served: readiness steers balancers, it refuses nothing.
	if _, err := credentialsv1.NewCredentialServiceClient(ts.conn).PutCredential(callCtx(t), validPut()); err != nil {
		t.Errorf("call while not ready: %v", err)
	}

	failing.Store(false)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, all...)

	var failLogs, recoverLogs int
	for _, line := range ts.logLines(t) {
		switch line["msg"] {
		case "readiness check failing":
			failLogs++
			if line["check"] != "redis" {
				t.Errorf("failing check logged as %v, want redis", line["check"])
			}
		case "readiness check passing again":
			recoverLogs++
		}
	}
	// Logged on each change, not on every run of the 20 ms poll.
	if failLogs != 1 || recoverLogs != 1 {
		t.Errorf("logged %d failures and %d recoveries, want 1 and 1:\n%s", failLogs, recoverLogs, ts.logs.String())
	}
}

func TestReadinessCheckNeedsNameAndFunc(t *testing.T) {
	for _, c := range []server.Check{{Name: "redis"}, {Check: func(context.Context) error { return nil }}} {
		if _, err := server.New(server.Config{Insecure: true, Readiness: []server.Check{c}}); err == nil {
			t.Errorf("New accepted readiness check %+v", c)
		}
	}
}

// TestMetrics: with Config.Metrics, every call is counted by method and
// code — failures in validation and handler panics included — series of
// methods never called exist at zero, and nothing a caller sent (the
// canary tenant, credential and token) becomes a label.
func TestMetrics(t *testing.T) {
	m := telemetry.NewMetrics()
	ts := startServer(t, server.Config{Metrics: m}, func(_ context.Context, method string) error {
		switch method {
		case "GetCredential":
			return apierr.New(codes.NotFound, apierr.ReasonCredentialNotFound, "credential not found", nil)
		case "IssueSession":
			panic(canary)
		}
		return nil
	})
	creds := credentialsv1.NewCredentialServiceClient(ts.conn)
	put := validPut()
	put.TenantId = "tenant-" + canary
	if _, err := creds.PutCredential(callCtx(t), put); err != nil {
		t.Fatalf("PutCredential: %v", err)
	}
	if _, err := creds.GetCredential(callCtx(t), &credentialsv1.GetCredentialRequest{TenantId: canary, CredentialId: canary}); status.Code(err) != codes.NotFound {
		t.Fatalf("GetCredential = %v, want NotFound", err)
	}
	if _, err := creds.PutCredential(callCtx(t), &credentialsv1.PutCredentialRequest{CredentialId: canary}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("invalid PutCredential = %v, want InvalidArgument", err)
	}
	if _, err := credentialsv1.NewSessionServiceClient(ts.conn).IssueSession(callCtx(t), &credentialsv1.IssueSessionRequest{TenantId: "acme", CredentialId: "c"}); status.Code(err) != codes.Internal {
		t.Fatalf("panicking IssueSession = %v, want Internal", err)
	}
	if err := watchOnce(callCtx(t), ts.conn, &telematicsv1.WatchPositionsRequest{UnitIds: []string{canary}}); err != nil {
		t.Fatalf("WatchPositions: %v", err)
	}

	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics = %d", rec.Code)
	}
	body := rec.Body.String()
	for _, want := range []string{
		`grpc_server_handled_total{grpc_code="OK",grpc_method="PutCredential",grpc_service="fleetbroker.credentials.v1.CredentialService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="PutCredential",grpc_service="fleetbroker.credentials.v1.CredentialService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="NotFound",grpc_method="GetCredential",grpc_service="fleetbroker.credentials.v1.CredentialService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="Internal",grpc_method="IssueSession",grpc_service="fleetbroker.credentials.v1.SessionService",grpc_type="unary"} 1`,
		`grpc_server_handled_total{grpc_code="OK",grpc_method="WatchPositions",grpc_service="fleetbroker.telematics.v1.TelematicsService",grpc_type="server_stream"} 1`,
		`grpc_server_msg_sent_total{grpc_method="WatchPositions",grpc_service="fleetbroker.telematics.v1.TelematicsService",grpc_type="server_stream"} 1`,
		`grpc_server_handling_seconds_count{grpc_method="PutCredential",grpc_service="fleetbroker.credentials.v1.CredentialService",grpc_type="unary"} 2`,
		// Initialized at zero: never called.
		`grpc_server_started_total{grpc_method="DeleteCredential",grpc_service="fleetbroker.credentials.v1.CredentialService",grpc_type="unary"} 0`,
		"go_goroutines ",
		"process_start_time_seconds ",
	} {
		if !strings.Contains(body, want+"\n") && !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(body, canary) {
		t.Errorf("a value sent by the caller is in the metrics:\n%s", body)
	}
}

// TestMetricsOff: without Config.Metrics the server records nothing
// anywhere. A server without its own registry could only reach the
// process-wide one (prometheus.DefaultRegisterer, where grpc-prometheus
// and client_golang register by default), so that is where the off case
// looks; the on case is the control that the same call and the same
// gathering do show grpc_server_* series when the server has a registry.
func TestMetricsOff(t *testing.T) {
	tests := []struct {
		name       string
		metrics    *telemetry.Metrics
		gatherer   func(*telemetry.Metrics) prometheus.Gatherer
		wantSeries bool
	}{
		{"off: nothing in the process-wide registry", nil,
			func(*telemetry.Metrics) prometheus.Gatherer { return prometheus.DefaultGatherer }, false},
		{"on: the server's registry counts the call", telemetry.NewMetrics(),
			func(m *telemetry.Metrics) prometheus.Gatherer { return m.Registry() }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts := startServer(t, server.Config{Metrics: tt.metrics}, nil)
			if _, err := credentialsv1.NewCredentialServiceClient(ts.conn).PutCredential(callCtx(t), validPut()); err != nil {
				t.Fatalf("PutCredential: %v", err)
			}
			if got := grpcServerSeries(t, tt.gatherer(tt.metrics)); (len(got) > 0) != tt.wantSeries {
				t.Errorf("grpc_server_* series with values: %v, want some: %v", got, tt.wantSeries)
			}
		})
	}
	// Nothing else in this process may have put series there either.
	if got := grpcServerSeries(t, prometheus.DefaultGatherer); len(got) > 0 {
		t.Errorf("the process-wide registry holds %v", got)
	}
}

// grpcServerSeries names the grpc_server_* families of g that hold a series
// with a non-zero value (a handled or started call).
func grpcServerSeries(t *testing.T, g prometheus.Gatherer) []string {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range families {
		if !strings.HasPrefix(f.GetName(), "grpc_server_") {
			continue
		}
		for _, m := range f.GetMetric() {
			if m.GetCounter().GetValue() > 0 || m.GetHistogram().GetSampleCount() > 0 || m.GetGauge().GetValue() > 0 {
				names = append(names, f.GetName())
				break
			}
		}
	}
	return names
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// TestMaxConnectionAge: a connection older than MaxConnectionAge gets
// GOAWAY, the client reconnects (through the balancer, in production)
// without a failed call, and a call still running MaxConnectionAgeGrace
// after the GOAWAY is cut.
func TestMaxConnectionAge(t *testing.T) {
	const age, grace = 200 * time.Millisecond, 300 * time.Millisecond
	f := &fakes{hook: func(ctx context.Context, method string) error {
		if method != "GetCredential" {
			return nil
		}
		<-ctx.Done() // a call that runs until its connection goes
		return status.FromContextError(ctx.Err()).Err()
	}}
	srv, err := server.New(server.Config{
		Insecure: true, Logger: slog.New(slog.DiscardHandler),
		MaxConnectionAge: age, MaxConnectionAgeGrace: grace,
	}, f.register)
	if err != nil {
		t.Fatal(err)
	}
	lis := &countingListener{Listener: bufconn.Listen(1 << 20)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeListener(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeListener: %v", err)
		}
	})
	ts := &testServer{lis: lis.Listener.(*bufconn.Listener)}
	conn := ts.dial(t)
	creds := credentialsv1.NewCredentialServiceClient(conn)

	t.Run("reconnect", func(t *testing.T) {
		start := time.Now()
		for lis.accepted.Load() < 3 {
			if _, err := creds.PutCredential(callCtx(t), validPut()); err != nil {
				t.Fatalf("call %s after start: %v", time.Since(start), err)
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%d connections in %s with MaxConnectionAge %s; want the client to reconnect", lis.accepted.Load(), time.Since(start), age)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	t.Run("grace", func(t *testing.T) {
		start := time.Now()
		_, err := creds.GetCredential(callCtx(t), &credentialsv1.GetCredentialRequest{TenantId: "acme", CredentialId: "long"})
		took := time.Since(start)
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("long call = %v, want Unavailable when its connection is closed", err)
		}
		// One age (+10% jitter), gRPC's GOAWAY handshake (a ping, about
		// 1 s), one grace, and slack for -race. Without the age, or with an
		// unbounded grace, the call would run into its 10 s deadline.
		if limit := age*11/10 + time.Second + grace + 2*time.Second; took > limit {
			t.Errorf("long call cut after %s, want within %s", took, limit)
		}
	})
}

// TestDrainPeriod: on shutdown the server first reports NOT_SERVING for the
// drain period while still serving every call, on old and new connections;
// then it closes the listener, ends open streams (a health Watch and a
// WatchPositions) with UNAVAILABLE so they do not hold the shutdown, and
// returns long before the grace period.
func TestDrainPeriod(t *testing.T) {
	const drain = 3 * time.Second
	const grace = time.Minute
	streaming := make(chan struct{}, 1)
	ts := startServer(t, server.Config{DrainPeriod: drain, GracePeriod: grace}, func(ctx context.Context, method string) error {
		if method != "WatchPositions" {
			return nil
		}
		streaming <- struct{}{}
		<-ctx.Done() // a stream that never ends by itself
		return status.FromContextError(ctx.Err()).Err()
	})

	healthWatch, err := healthpb.NewHealthClient(ts.conn).Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	if msg, err := healthWatch.Recv(); err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first health status = %v, %v; want SERVING", msg.GetStatus(), err)
	}
	positions, err := telematicsv1.NewTelematicsServiceClient(ts.conn).WatchPositions(context.Background(), &telematicsv1.WatchPositionsRequest{})
	if err != nil {
		t.Fatalf("WatchPositions: %v", err)
	}
	select {
	case <-streaming:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream never reached its handler")
	}

	start := time.Now()
	ts.cancel()
	if msg, err := healthWatch.Recv(); err != nil || msg.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health status after cancel = %v, %v; want NOT_SERVING", msg.GetStatus(), err)
	}
	// While draining, every call is served, on a new connection too, and
	// health says NOT_SERVING for readiness but SERVING for liveness.
	fresh := ts.dial(t)
	for name, conn := range map[string]*grpc.ClientConn{"existing connection": ts.conn, "new connection": fresh} {
		if _, err := credentialsv1.NewCredentialServiceClient(conn).PutCredential(callCtx(t), validPut()); err != nil {
			t.Errorf("%s: call during the drain: %v", name, err)
		}
		for svc, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
			"": healthpb.HealthCheckResponse_NOT_SERVING, telematicsService: healthpb.HealthCheckResponse_NOT_SERVING,
			server.LivenessService: healthpb.HealthCheckResponse_SERVING,
		} {
			resp, err := healthpb.NewHealthClient(conn).Check(callCtx(t), &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.GetStatus() != want {
				t.Errorf("%s: Check(%q) during the drain = %v, %v; want %v", name, svc, resp.GetStatus(), err, want)
			}
		}
	}
	if elapsed := time.Since(start); elapsed >= drain {
		t.Fatalf("the checks above took %s, longer than the drain period; the test proves nothing", elapsed)
	}

	// Then both streams end with UNAVAILABLE (reconnect elsewhere), not
	// before the drain period is over.
	for name, recv := range map[string]func() error{
		"health Watch":   func() error { return recvErr(healthWatch) },
		"WatchPositions": func() error { return recvErr(positions) },
	} {
		err := recv()
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s ended with %v, want Unavailable", name, err)
		}
		if elapsed := time.Since(start); elapsed < drain {
			t.Errorf("%s ended %s after cancel, inside the %s drain period", name, elapsed, drain)
		}
	}
	// The open streams did not hold the shutdown for the grace period.
	if err := ts.waitStopped(t, 20*time.Second); err != nil {
		t.Errorf("ServeListener = %v, want nil", err)
	}
	// The listener is closed: a new connection gets nowhere.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(ts.dial(t)).Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable && status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a call after shutdown = %v, want Unavailable", err)
	}
	if strings.Contains(ts.logs.String(), "grace period over") {
		t.Errorf("open streams held the shutdown until the grace period ran out:\n%s", ts.logs.String())
	}
}

// TestReadinessChecksIndependent: a check that hangs until its timeout
// does not delay another check's verdict; health follows the fast check
// at once.
func TestReadinessChecksIndependent(t *testing.T) {
	var redisDown atomic.Bool
	var vaultRuns atomic.Int32
	ts := startServer(t, server.Config{
		Readiness: []server.Check{
			{Name: "vault", Check: func(ctx context.Context) error {
				if vaultRuns.Add(1) == 1 {
					return nil
				}
				<-ctx.Done() // a Vault behind a dead load balancer
				return ctx.Err()
			}},
			{Name: "redis", Check: func(context.Context) error {
				if redisDown.Load() {
					return errors.New("connection refused")
				}
				return nil
			}},
		},
		ReadinessInterval: 20 * time.Millisecond, ReadinessTimeout: time.Hour,
	}, nil)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, "")
	waitUntilTrue(t, "the vault check hangs", func() bool { return vaultRuns.Load() >= 2 })
	redisDown.Store(true)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_NOT_SERVING, "")
	redisDown.Store(false)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, "")
}

// TestReadinessRecoversFast: a failing check is retried about twice a second
// whatever the interval, so a dependency that returns is announced at once
// rather than one (long) interval later.
func TestReadinessRecoversFast(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	ts := startServer(t, server.Config{
		Readiness: []server.Check{{Name: "redis", Check: func(context.Context) error {
			if down.Load() {
				return errors.New("connection refused")
			}
			return nil
		}}},
		ReadinessInterval: time.Hour, ReadinessTimeout: time.Second,
	}, nil)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_NOT_SERVING, "")
	down.Store(false)
	waitHealth(t, ts.conn, healthpb.HealthCheckResponse_SERVING, "")
}

func waitUntilTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMaxConcurrentStreams: one connection may hold at most
// MaxConcurrentStreams calls and streams at once; the next waits (it is
// not refused) until one ends.
func TestMaxConcurrentStreams(t *testing.T) {
	const limit = 3
	ts := startServer(t, server.Config{MaxConcurrentStreams: limit}, nil)
	health := healthpb.NewHealthClient(ts.conn)
	open := func(ctx context.Context) error {
		stream, err := health.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}
	var cancels []context.CancelFunc
	for i := range limit {
		ctx, cancel := context.WithCancel(callCtx(t))
		cancels = append(cancels, cancel)
		if err := open(ctx); err != nil {
			t.Fatalf("stream %d of %d: %v", i+1, limit, err)
		}
	}
	// One more must wait for a free stream: it gets nothing while the
	// others are open (the timeout only bounds how long the test looks).
	waiting, cancel := context.WithTimeout(callCtx(t), 300*time.Millisecond)
	defer cancel()
	if err := open(waiting); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("stream %d on one connection: %v; want it to wait for a free stream", limit+1, err)
	}
	cancels[0]()
	if err := open(callCtx(t)); err != nil {
		t.Fatalf("a stream after one ended: %v", err)
	}
}
