package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
)

// TracingEnabled reports whether the environment asks for traces:
// OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set,
// and OTEL_SDK_DISABLED is not "true".
func TracingEnabled() bool {
	if strings.EqualFold(strings.TrimSpace(os.Getenv("OTEL_SDK_DISABLED")), "true") {
		return false
	}
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// SetupTracing installs the global OpenTelemetry tracer provider and
// propagator when TracingEnabled: spans are batched and exported over OTLP
// gRPC to the configured endpoint ("http://collector:4317" is plaintext,
// "https://…" TLS; OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, OTEL_TRACES_SAMPLER,
// OTEL_BSP_* and OTEL_RESOURCE_ATTRIBUTES apply as the OpenTelemetry
// specification says), and W3C trace context (traceparent, tracestate) is
// read from and written to gRPC metadata. Baggage is not propagated: it is
// free text from callers that would travel on to every hop.
//
// Otherwise it does nothing at all — no exporter, no goroutine, the globals
// untouched — and returns a shutdown that does nothing.
//
// serviceName is the service.name resource attribute ("fleetbroker-gateway");
// OTEL_SERVICE_NAME overrides it. The caller must call shutdown before the
// process exits, with a deadline: it flushes the spans still queued.
//
// Connecting is lazy: an unreachable collector does not fail SetupTracing;
// its spans are dropped after the exporter's retries.
func SetupTracing(ctx context.Context, serviceName string) (shutdown func(context.Context) error, err error) {
	if !TracingEnabled() {
		return func(context.Context) error { return nil }, nil
	}
	exporter, err := otlptracegrpc.New(ctx)
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter: %w", err)
	}
	// Host name and SDK version only: resource.WithProcess would add the
	// command line, and flags may carry secrets (--vault-token).
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(serviceName)),
		resource.WithHost(),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(), // last, so OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		_ = exporter.Shutdown(ctx)
		return nil, fmt.Errorf("tracing: resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	return tp.Shutdown, nil
}

// TracingServerHandler is the gRPC server stats handler that starts a span
// per call (server.Config.StatsHandler, or grpc.StatsHandler(...)). Health
// checks are not traced: probes poll them every few seconds. Spans carry
// the method, the status code and message and peer addresses — never
// payloads or metadata (message events are off, as otelgrpc defaults), so
// handles in `authorization` and secrets in requests stay out of traces.
//
// It uses the global tracer provider and propagator, so it may be built
// before SetupTracing runs, and costs almost nothing when tracing is off.
func TracingServerHandler() stats.Handler {
	return otelgrpc.NewServerHandler(otelgrpc.WithFilter(filters.Not(filters.HealthCheck())))
}

// TracingDialOption traces outgoing calls on a client connection (the
// gateway's calls to the credentials service) and propagates the trace
// context to the callee.
func TracingDialOption() grpc.DialOption {
	return grpc.WithStatsHandler(otelgrpc.NewClientHandler())
}
