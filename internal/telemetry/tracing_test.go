package telemetry_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
)

// clearOTelEnv leaves only what a test sets.
func clearOTelEnv(t *testing.T) {
	for _, k := range []string{
		"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
		"OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_HEADERS",
		"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
	} {
		t.Setenv(k, "")
	}
}

// restoreOTelGlobals puts no-op globals back after a test that installed a
// real provider, so later tests start without one.
func restoreOTelGlobals(t *testing.T) {
	t.Cleanup(func() {
		otel.SetTracerProvider(noop.NewTracerProvider())
		otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator())
	})
}

func TestSetupTracingNoopWithoutEndpoint(t *testing.T) {
	for _, tt := range []struct {
		name string
		env  map[string]string
	}{
		{"no endpoint", nil},
		{"SDK disabled", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clearOTelEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			restoreOTelGlobals(t)
			// Comparable sentinels: the globals must still be these after.
			tp, prop := noop.NewTracerProvider(), sentinelPropagator{}
			otel.SetTracerProvider(tp)
			otel.SetTextMapPropagator(prop)
			if telemetry.TracingEnabled() {
				t.Fatal("TracingEnabled() = true")
			}
			shutdown, err := telemetry.SetupTracing(context.Background(), "fleetbroker-test")
			if err != nil {
				t.Fatalf("SetupTracing: %v", err)
			}
			if otel.GetTracerProvider() != trace.TracerProvider(tp) || otel.GetTextMapPropagator() != propagation.TextMapPropagator(prop) {
				t.Error("SetupTracing without an endpoint changed the global provider or propagator")
			}
			if err := shutdown(context.Background()); err != nil {
				t.Errorf("shutdown: %v", err)
			}
		})
	}
}

// sentinelPropagator is a comparable propagator that does nothing.
type sentinelPropagator struct{ propagation.TraceContext }

// collector is an OTLP trace collector that keeps what it receives.
type collector struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.Span
	raw   []string
}

func (c *collector) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.raw = append(c.raw, prototext.Format(req))
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			c.spans = append(c.spans, ss.GetSpans()...)
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func (c *collector) received() ([]*tracepb.Span, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*tracepb.Span(nil), c.spans...), strings.Join(c.raw, "\n")
}

func serveGRPC(t *testing.T, s *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

// TestSetupTracingExports: with an endpoint, client and server spans of a
// call reach the collector in one trace (the context propagated in
// metadata), named by the method; health checks are not traced; and
// neither the request's secret nor the caller's handle is anywhere in
// what was exported.
func TestSetupTracingExports(t *testing.T) {
	clearOTelEnv(t)
	restoreOTelGlobals(t)
	col := &collector{}
	colServer := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(colServer, col)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+serveGRPC(t, colServer))
	t.Setenv("OTEL_TRACES_SAMPLER", "always_on")

	shutdown, err := telemetry.SetupTracing(context.Background(), "fleetbroker-test")
	if err != nil {
		t.Fatalf("SetupTracing: %v", err)
	}
	shutdownCalled := false
	t.Cleanup(func() {
		if !shutdownCalled {
			_ = shutdown(context.Background())
		}
	})

	srv := grpc.NewServer(grpc.StatsHandler(telemetry.TracingServerHandler()))
	credentialsv1.RegisterCredentialServiceServer(srv, credentialsv1.UnimplementedCredentialServiceServer{})
	healthpb.RegisterHealthServer(srv, health.NewServer())
	conn, err := grpc.NewClient(serveGRPC(t, srv),
		grpc.WithTransportCredentials(insecure.NewCredentials()), telemetry.TracingDialOption())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer fbs_"+canary)
	_, err = credentialsv1.NewCredentialServiceClient(conn).PutCredential(ctx, &credentialsv1.PutCredentialRequest{
		TenantId: "tenant-" + canary, CredentialId: "cred",
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: canary}},
	})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("PutCredential = %v, want Unimplemented", err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health Check: %v", err)
	}

	shutdownCtx, cancelShutdown := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelShutdown()
	shutdownCalled = true
	if err := shutdown(shutdownCtx); err != nil { // flushes the batch
		t.Fatalf("shutdown: %v", err)
	}

	spans, raw := col.received()
	const method = "fleetbroker.credentials.v1.CredentialService/PutCredential"
	var server, client *tracepb.Span
	for _, s := range spans {
		switch {
		case strings.Contains(s.GetName(), "Health") && s.GetKind() == tracepb.Span_SPAN_KIND_SERVER:
			t.Errorf("health check traced by the server: %s", s.GetName())
		case s.GetName() == method && s.GetKind() == tracepb.Span_SPAN_KIND_SERVER:
			server = s
		case s.GetName() == method && s.GetKind() == tracepb.Span_SPAN_KIND_CLIENT:
			client = s
		}
	}
	if server == nil || client == nil {
		t.Fatalf("want a server and a client span named %s; got %d spans:\n%s", method, len(spans), raw)
	}
	if string(server.GetTraceId()) != string(client.GetTraceId()) || string(server.GetParentSpanId()) != string(client.GetSpanId()) {
		t.Error("the server span is not the child of the client span: trace context was not propagated")
	}
	if !strings.Contains(raw, "fleetbroker-test") {
		t.Error("service.name is not in the exported resource")
	}
	if strings.Contains(raw, canary) {
		t.Errorf("a secret, handle or tenant id was exported with the spans:\n%s", raw)
	}
}

// TestSetupTracingUnreachableCollector: a collector that is down neither
// fails startup nor hangs shutdown past its deadline.
func TestSetupTracingUnreachableCollector(t *testing.T) {
	clearOTelEnv(t)
	restoreOTelGlobals(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://"+addr)

	shutdown, err := telemetry.SetupTracing(context.Background(), "fleetbroker-test")
	if err != nil {
		t.Fatalf("SetupTracing with a closed endpoint: %v", err)
	}
	_, span := otel.Tracer("test").Start(context.Background(), "op")
	if !span.IsRecording() {
		t.Error("SetupTracing with an endpoint did not install a recording provider")
	}
	span.End()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_ = shutdown(ctx) // the flush fails; that is expected
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("shutdown took %s with a 300ms deadline", took)
	}
}

// TestInstrumentRedisTracing: Redis spans name the command and never carry
// its keys or values.
func TestInstrumentRedisTracing(t *testing.T) {
	clearOTelEnv(t)
	restoreOTelGlobals(t)
	col := &collector{}
	colServer := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(colServer, col)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+serveGRPC(t, colServer))
	t.Setenv("OTEL_TRACES_SAMPLER", "always_on")
	shutdown, err := telemetry.SetupTracing(context.Background(), "fleetbroker-test")
	if err != nil {
		t.Fatal(err)
	}
	rdb := newMiniRedisClient(t)
	if err := telemetry.InstrumentRedisTracing(rdb); err != nil {
		t.Fatalf("InstrumentRedisTracing: %v", err)
	}
	ctx := context.Background()
	if err := rdb.Set(ctx, "fb:{tenant-"+canary+"}:tok", "sealed-"+canary, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := shutdown(sctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	spans, raw := col.received()
	var found bool
	for _, s := range spans {
		found = found || s.GetName() == "set"
	}
	if !found {
		t.Errorf("no span named set:\n%s", raw)
	}
	if strings.Contains(raw, canary) {
		t.Errorf("a Redis key or value was exported with the spans:\n%s", raw)
	}
}

// TestClientDialOptions: calls made on a connection with ClientDialOptions
// are counted by method and code, with a latency histogram.
func TestClientDialOptions(t *testing.T) {
	m := telemetry.NewMetrics()
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, m.ClientDialOptions()...)
	conn, err := grpc.NewClient(serveGRPC(t, srv), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := healthpb.NewHealthClient(conn)
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: canary}); status.Code(err) != codes.NotFound {
		t.Fatalf("Check(unknown) = %v, want NotFound", err)
	}
	base := map[string]string{"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_type": "unary"}
	with := func(k, v string) map[string]string {
		l := map[string]string{k: v}
		for k, v := range base {
			l[k] = v
		}
		return l
	}
	if got := count(t, m, "grpc_client_handled_total", with("grpc_code", "OK")); got != 1 {
		t.Errorf("grpc_client_handled_total OK = %v, want 1", got)
	}
	if got := count(t, m, "grpc_client_handled_total", with("grpc_code", "NotFound")); got != 1 {
		t.Errorf("grpc_client_handled_total NotFound = %v, want 1", got)
	}
	if got := count(t, m, "grpc_client_handling_seconds", base); got != 2 {
		t.Errorf("grpc_client_handling_seconds count = %v, want 2", got)
	}
	assertNoCanary(t, m)
}
