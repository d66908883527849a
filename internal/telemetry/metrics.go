// Package telemetry is fleetbroker's observability: Prometheus metrics on a
// registry of their own, and OpenTelemetry tracing exported over OTLP when
// the environment asks for it.
//
// # What a label may hold
//
// Every label value is drawn from a fixed, small set chosen here: gRPC
// method names of registered services, provider names, Wialon service names
// and FleetUp path templates the broker knows, Redis command names, Vault
// operation names, status classes. Anything else is reported as "other".
// No label ever holds a tenant id (tenants are unbounded and chosen by
// customers), a credential id, a session handle or id, a token, a secret,
// a raw URL path or any other text a tenant or caller controls: such values
// would leak secrets into a system with wide read access, and each distinct
// value would be a new time series.
//
// # Nil receivers
//
// Every Observe method, InstrumentTransport and RedisHook accept a nil
// *Metrics and then record nothing, so code paths need no "metrics enabled?"
// branches.
package telemetry

import (
	"context"
	"errors"
	"net/http"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
)

// Namespace prefixes fleetbroker's own metrics.
const Namespace = "fleetbroker"

// Other is the label value of anything outside a label's known set.
const Other = "other"

// Label values of result labels.
const (
	resultOK    = "ok"
	resultError = "error"
)

// Buckets, in seconds. Upstream calls are bounded by --upstream-timeout
// (10 s by default); Vault and Redis answer in milliseconds when healthy, so
// their buckets start lower and stop at their own timeouts.
var (
	upstreamBuckets = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20}
	vaultBuckets    = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}
	redisBuckets    = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
)

// Metrics owns a Prometheus registry and every fleetbroker metric in it.
// Each Metrics is independent (it does not touch the global registry), so
// tests and several servers in one process (`fleetbroker dev`) do not
// collide. Create one per process with NewMetrics and share it.
type Metrics struct {
	reg    *prometheus.Registry
	server *grpcprom.ServerMetrics
	client *grpcprom.ClientMetrics

	upstream          *prometheus.HistogramVec // provider, endpoint, status
	upstreamErrors    *prometheus.CounterVec   // provider, kind
	tokenLookups      *prometheus.CounterVec   // provider, kind, result
	tokenMints        *prometheus.CounterVec   // provider, kind, result
	tokenMintDuration *prometheus.HistogramVec // provider, kind
	vault             *prometheus.HistogramVec // operation, result
	redis             *prometheus.HistogramVec // command, result
	readiness         *prometheus.GaugeVec     // check
}

// NewMetrics returns a Metrics with gRPC server and client metrics, the
// upstream, token cache, Vault and Redis metrics, and the Go runtime and
// process collectors registered.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg:    prometheus.NewRegistry(),
		server: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram()),
		client: grpcprom.NewClientMetrics(grpcprom.WithClientHandlingTimeHistogram()),
		upstream: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "upstream", Name: "request_duration_seconds",
			Help:    "Duration of HTTP requests to Wialon and FleetUp, until the response body is closed. endpoint is a Wialon service name or a FleetUp path template; status is the HTTP status, or timeout, canceled or error when no response came.",
			Buckets: upstreamBuckets,
		}, []string{"provider", "endpoint", "status"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "gateway", Name: "upstream_errors_total",
			Help: "Upstream failures met by gateway calls, by what they mean (kind): Wialon errors that arrive with HTTP 200 included, a lost session that was renewed and retried counted once as session_invalid, and calls refused by the account's shared rate budget as rate_budget.",
		}, []string{"provider", "kind"}),
		tokenLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "token_cache", Name: "lookups_total",
			Help: "Shared token cache lookups (one per flight: concurrent equal requests of one process count once) by whether Redis already held the token.",
		}, []string{"provider", "kind", "result"}),
		tokenMints: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "token_cache", Name: "mints_total",
			Help: "Upstream logins of the shared token cache: Wialon token/login (kind=wialon-eid) and FleetUp /token (kind=fleetup-jwt).",
		}, []string{"provider", "kind", "result"}),
		tokenMintDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "token_cache", Name: "mint_duration_seconds",
			Help:    "Duration of upstream logins of the shared token cache, secret resolution included.",
			Buckets: upstreamBuckets,
		}, []string{"provider", "kind"}),
		vault: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "vault", Name: "request_duration_seconds",
			Help:    "Duration of Vault transit calls by operation, retries included.",
			Buckets: vaultBuckets,
		}, []string{"operation", "result"}),
		redis: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "redis", Name: "command_duration_seconds",
			Help:    "Duration of Redis commands by command name (pipeline for a pipeline); result nil is a missing key.",
			Buckets: redisBuckets,
		}, []string{"command", "result"}),
		readiness: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace, Subsystem: "readiness", Name: "check_passing",
			Help: "1 if the readiness check passed at its last run, else 0. The gRPC health status is NOT_SERVING while any check fails.",
		}, []string{"check"}),
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.server, m.client,
		m.upstream, m.upstreamErrors, m.tokenLookups, m.tokenMints, m.tokenMintDuration,
		m.vault, m.redis, m.readiness,
	)
	return m
}

// Registry is the registry the metrics live in, e.g. to register more
// collectors or to gather in tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus text format (or
// OpenMetrics, with trace exemplars, when the scraper asks for it).
func (m *Metrics) Handler() http.Handler {
	return promhttp.InstrumentMetricHandler(m.reg, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		Registry:          m.reg, // counts its own errors in promhttp_metric_handler_errors_total
		EnableOpenMetrics: true,
		// A scrape is cheap, but several scrapers at once should not pile up.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
}

// UnaryServerInterceptor records grpc_server_* metrics of unary calls.
// Labels: grpc_type, grpc_service, grpc_method, grpc_code — all bounded by
// the registered services (calls to unknown methods never reach interceptors).
func (m *Metrics) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return m.server.UnaryServerInterceptor(grpcprom.WithExemplarFromContext(traceExemplar))
}

// StreamServerInterceptor records grpc_server_* metrics of streams.
func (m *Metrics) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return m.server.StreamServerInterceptor(grpcprom.WithExemplarFromContext(traceExemplar))
}

// InitializeServer creates the series of every method registered on s at
// zero, so rates and alerts work before the first call. Call it after all
// services are registered.
func (m *Metrics) InitializeServer(s *grpc.Server) { m.server.InitializeMetrics(s) }

// ClientDialOptions record grpc_client_* metrics (with a handling time
// histogram) of calls made on the connection, e.g. the gateway's calls to
// the credentials service.
func (m *Metrics) ClientDialOptions() []grpc.DialOption {
	if m == nil {
		return nil
	}
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(m.client.UnaryClientInterceptor(grpcprom.WithExemplarFromContext(traceExemplar))),
		grpc.WithChainStreamInterceptor(m.client.StreamClientInterceptor(grpcprom.WithExemplarFromContext(traceExemplar))),
	}
}

// traceExemplar links a call's latency sample to its trace when the call is
// sampled. A trace id is random and carries nothing about the call.
func traceExemplar(ctx context.Context) prometheus.Labels {
	if sc := trace.SpanContextFromContext(ctx); sc.IsSampled() {
		return prometheus.Labels{"trace_id": sc.TraceID().String()}
	}
	return nil
}

// Known label values. Keep these sets small and closed: a value not listed
// is reported as Other.
var (
	providers = set("wialon", "fleetup")
	// tokenKinds are wialon.TokenKind and fleetup.TokenKind (this package
	// imports no provider).
	tokenKinds = set("wialon-eid", "fleetup-jwt")
	// upstreamErrorKinds are upstream.Kind's String values, plus the
	// gateway's own rate budget.
	upstreamErrorKinds = set("internal", "rejected", "session_invalid", "rate_limited", "unavailable",
		"invalid_input", "access_denied", "not_found", "not_allowed", "rate_budget")
	// vaultOps are the operation names of internal/transit's Vault calls,
	// plus the readiness probe.
	vaultOps = set("encrypt", "decrypt", "rewrap", "datakey", "hmac", "token lookup", "token renew",
		"rotate key", "ensure key", "login", "approle secret_id unwrap", "health")
)

func set(values ...string) map[string]struct{} {
	m := make(map[string]struct{}, len(values))
	for _, v := range values {
		m[v] = struct{}{}
	}
	return m
}

// bounded returns v if it is in known, else Other.
func bounded(v string, known map[string]struct{}) string {
	if _, ok := known[v]; ok {
		return v
	}
	return Other
}

func result(err error) string {
	if err != nil {
		return resultError
	}
	return resultOK
}

// ObserveUpstreamError counts a failed upstream call of the gateway. kind is
// an upstream.Kind's String(), or "rate_budget" when the account's shared
// rate budget refused the call before it was made.
func (m *Metrics) ObserveUpstreamError(provider, kind string) {
	if m == nil {
		return
	}
	m.upstreamErrors.WithLabelValues(bounded(provider, providers), bounded(kind, upstreamErrorKinds)).Inc()
}

// ObserveTokenLookup counts a shared token cache lookup. kind is the
// tokencache Kind; the provider is derived from it.
func (m *Metrics) ObserveTokenLookup(kind string, hit bool) {
	if m == nil {
		return
	}
	r := "miss"
	if hit {
		r = "hit"
	}
	kind = bounded(kind, tokenKinds)
	m.tokenLookups.WithLabelValues(tokenProvider(kind), kind, r).Inc()
}

// ObserveTokenMint records one call of a token cache mint function (one
// upstream login, or an attempt at one).
func (m *Metrics) ObserveTokenMint(kind string, took time.Duration, err error) {
	if m == nil {
		return
	}
	kind = bounded(kind, tokenKinds)
	provider := tokenProvider(kind)
	m.tokenMints.WithLabelValues(provider, kind, result(err)).Inc()
	m.tokenMintDuration.WithLabelValues(provider, kind).Observe(took.Seconds())
}

func tokenProvider(kind string) string {
	switch kind {
	case "wialon-eid":
		return "wialon"
	case "fleetup-jwt":
		return "fleetup"
	default:
		return Other
	}
}

// ObserveVault records one Vault call. op is the operation name
// internal/transit uses in its errors ("encrypt", "decrypt", "datakey",
// "hmac", "rewrap", "token lookup", "token renew", "rotate key",
// "ensure key", "login", "approle secret_id unwrap") or "health"; any other
// is "other". The metric writes spaces as underscores ("token_lookup").
func (m *Metrics) ObserveVault(op string, took time.Duration, err error) {
	if m == nil {
		return
	}
	m.vault.WithLabelValues(labelName(bounded(op, vaultOps)), result(err)).Observe(took.Seconds())
}

// labelName turns "token lookup" into "token_lookup".
func labelName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == ' ' {
			b[i] = '_'
		}
	}
	return string(b)
}

// SetReadiness records the outcome of a readiness check. check must be a
// name the program chose (e.g. "redis", "vault"), never input.
func (m *Metrics) SetReadiness(check string, ok bool) {
	if m == nil {
		return
	}
	v := 0.0
	if ok {
		v = 1
	}
	m.readiness.WithLabelValues(check).Set(v)
}

// errorStatus names the outcome of an HTTP request that got no response.
func errorStatus(err error) string {
	switch {
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	var to interface{ Timeout() bool }
	if errors.As(err, &to) && to.Timeout() {
		return "timeout"
	}
	return resultError
}
