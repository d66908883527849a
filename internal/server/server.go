// Package server is the one gRPC server bootstrap shared by every
// fleetbroker subcommand: the credentials service, the gateway and `dev`
// differ only in which services they register, never in how interceptors,
// health, reflection and shutdown are wired.
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"sync"
	"time"

	"buf.build/go/protovalidate"
	middleware "github.com/grpc-ecosystem/go-grpc-middleware/v2"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
)

// Connection management defaults, chosen for a mesh or a Kubernetes Service.
const (
	// DefaultMaxConnectionAge: gRPC multiplexes every call of a client over
	// one long-lived HTTP/2 connection, and an L4 balancer (a ClusterIP
	// Service, an NLB) balances connections, not calls — so without an age
	// limit a client stays on the replica it first reached, and replicas
	// added by a scale-out get no traffic. After this age (±10% jitter, added
	// by gRPC) the server sends GOAWAY and the client reconnects through the
	// balancer. Five minutes bounds the imbalance while costing each client
	// one reconnect (and TLS handshake) per five minutes.
	DefaultMaxConnectionAge = 5 * time.Minute
	// DefaultMaxConnectionAgeGrace is how long calls already running may
	// finish on a connection after its GOAWAY; then it is closed. It is
	// longer than the default unary deadline (30 s), so no unary call is cut.
	// A WatchPositions stream older than that ends with UNAVAILABLE and
	// its client re-subscribes — which moves long streams between replicas
	// too. A negative --max-connection-age-grace keeps streams forever.
	DefaultMaxConnectionAgeGrace = time.Minute
	// DefaultKeepaliveTime: after this long without activity the server pings
	// the client. Idle connections through NAT and L4 balancers are dropped
	// silently after a few minutes (AWS NLB: 350 s); a ping every minute keeps
	// them, and finds dead clients (their streams hold watch subscriptions).
	DefaultKeepaliveTime = time.Minute
	// DefaultKeepaliveTimeout is how long the server waits for a ping's
	// answer before it closes the connection.
	DefaultKeepaliveTimeout = 20 * time.Second
	// DefaultKeepaliveMinTime is the shortest interval at which a client may
	// ping. gRPC's default (5 minutes, and no pings without an active call)
	// answers a client or sidecar that pings every 30 s with GOAWAY
	// "too_many_pings" and drops its connection; 10 s (the smallest interval
	// gRPC clients use) admits them while still bounding ping floods.
	DefaultKeepaliveMinTime = 10 * time.Second
	// DefaultDrainPeriod is how long shutdown keeps serving while health
	// reports NOT_SERVING: long enough for a balancer that health-checks
	// every few seconds, or for Kubernetes to take the pod out of its
	// endpoints, to stop sending calls before any is refused.
	DefaultDrainPeriod = 5 * time.Second
	// DefaultReadinessInterval is how often the readiness checks run.
	DefaultReadinessInterval = 5 * time.Second
	// DefaultReadinessTimeout bounds one run of one readiness check.
	DefaultReadinessTimeout = 3 * time.Second
	// DefaultMaxConcurrentStreams bounds the calls and streams one client
	// connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS;
	// gRPC's own default is unbounded). A client past it waits for a free
	// stream, it is not refused; so one connection cannot make the server
	// hold an unbounded number of handlers, and the per-handle and
	// per-tenant stream limits of the gateway still apply within it.
	DefaultMaxConcurrentStreams = 1000
	// DefaultGracePeriod is how long shutdown lets in-flight calls finish
	// after the drain period (--shutdown-grace).
	DefaultGracePeriod = 10 * time.Second
	// DefaultDeadline bounds a unary call whose caller set no deadline
	// (--default-deadline).
	DefaultDeadline = 30 * time.Second
	// DefaultMaxRecvMsgSize is the largest inbound message, 1 MiB
	// (--max-recv-msg-size).
	DefaultMaxRecvMsgSize = 1 << 20
)

// LivenessService is a grpc.health.v1 service name that reports SERVING
// for as long as the process serves, whatever the readiness checks say:
// for a Kubernetes gRPC liveness probe (grpc: {port: …, service: liveness}).
// Service "" (and every real service name) is readiness, and must not be
// used for liveness, or an outage of Redis or Vault would restart every pod.
const LivenessService = "liveness"

// Check is one readiness check, e.g. a Redis PING or Vault's health
// endpoint. Name is a fixed name chosen by the program ("redis", "vault"):
// it appears in logs and in the fleetbroker_readiness_check_passing metric.
// Check must return when its context is done.
type Check struct {
	Name  string
	Check func(ctx context.Context) error
}

// Config is what every fleetbroker gRPC server shares.
type Config struct {
	// Listen is the TCP address to serve on, e.g. ":7401".
	Listen string
	// Reflection registers the gRPC reflection service (for grpcurl).
	Reflection bool
	// DrainPeriod is how long shutdown reports NOT_SERVING while still
	// serving, before it stops accepting calls: the time health-checking
	// load balancers (and Kubernetes endpoint updates) need to send new
	// calls elsewhere. 0: stop at once.
	DrainPeriod time.Duration
	// GracePeriod bounds how long shutdown then waits for in-flight calls.
	GracePeriod time.Duration
	Logger      *slog.Logger
	// TLS serves TLS 1.3 (mTLS when it requires client certificates).
	TLS *tls.Config
	// Insecure allows plaintext when TLS is nil: for a mesh sidecar that
	// terminates mTLS, or dev. Without it a server without TLS refuses to start.
	Insecure bool
	// DefaultDeadline bounds unary calls whose caller set no deadline.
	DefaultDeadline time.Duration
	// MaxRecvMsgSize caps inbound messages (default 1 MiB).
	MaxRecvMsgSize int
	// MaxConcurrentStreams bounds the calls and streams open at once on one
	// client connection (0: DefaultMaxConcurrentStreams; negative: no bound).
	MaxConcurrentStreams int
	// Unary and Stream run after recovery and before validation: identity,
	// authorization, audit and rate limits.
	Unary  []grpc.UnaryServerInterceptor
	Stream []grpc.StreamServerInterceptor
	// Options are appended to the server options.
	Options []grpc.ServerOption

	// Metrics, if set, records grpc_server_* metrics of every call (the
	// interceptors run right after the request id, so a panic recovered
	// further in still counts as INTERNAL) and initializes the series of
	// every registered method at zero.
	Metrics *telemetry.Metrics
	// StatsHandler, if set, is installed on the server, e.g.
	// telemetry.TracingServerHandler() for a span per call.
	StatsHandler stats.Handler

	// MaxConnectionAge is how long a connection may live before the server
	// sends GOAWAY (0: DefaultMaxConnectionAge; negative: forever).
	MaxConnectionAge time.Duration
	// MaxConnectionAgeGrace is how long calls may finish after that GOAWAY
	// (0: DefaultMaxConnectionAgeGrace; negative: forever).
	MaxConnectionAgeGrace time.Duration
	// KeepaliveTime is the idle time after which the server pings a client
	// (0: DefaultKeepaliveTime); KeepaliveTimeout how long it waits for the
	// answer (0: DefaultKeepaliveTimeout).
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	// KeepaliveMinTime is the shortest ping interval a client may use,
	// with or without calls in flight (0: DefaultKeepaliveMinTime).
	KeepaliveMinTime time.Duration

	// Readiness are the checks of the dependencies the server cannot answer
	// without (Redis, Vault). grpc.health.v1 is the readiness signal: while
	// any check fails, every registered service and "" report NOT_SERVING,
	// and SERVING again once all pass. With checks, the status is
	// NOT_SERVING from New until every check has passed once. Serve runs
	// each check at once, then every ReadinessInterval while it passes and
	// every 500 ms (or ReadinessInterval, if shorter) while it fails, so
	// health follows a dependency within about one interval both ways.
	// Liveness is the process answering at all: probe LivenessService (or
	// the TCP port), never "".
	Readiness         []Check
	ReadinessInterval time.Duration // 0: DefaultReadinessInterval
	ReadinessTimeout  time.Duration // per check; 0: DefaultReadinessTimeout
}

// Server is a gRPC server with health, reflection and the standard
// interceptor chain.
type Server struct {
	cfg    Config
	grpc   *grpc.Server
	health *health.Server
	// services are the registered service names, health and reflection
	// included; with "" they are what readiness sets.
	services  []string
	readiness *readiness
	// stopping is cancelled when shutdown stops accepting calls; it ends
	// the streams still open (see endStreams).
	stopping    context.Context
	stopStreams context.CancelFunc
}

// New builds a server and lets each register func add its services.
func New(cfg Config, register ...func(*grpc.Server)) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.GracePeriod <= 0 {
		cfg.GracePeriod = DefaultGracePeriod
	}
	if cfg.DefaultDeadline <= 0 {
		cfg.DefaultDeadline = DefaultDeadline
	}
	if cfg.MaxRecvMsgSize <= 0 {
		cfg.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	if cfg.TLS == nil && !cfg.Insecure {
		return nil, fmt.Errorf("refusing to serve plaintext: set --tls-cert and --tls-key, or --insecure behind a sidecar that terminates mTLS")
	}
	if cfg.TLS == nil {
		cfg.Logger.Warn("serving plaintext gRPC without TLS: only safe behind a sidecar that terminates mTLS, or in dev")
	}
	for _, c := range cfg.Readiness {
		if c.Name == "" || c.Check == nil {
			return nil, fmt.Errorf("readiness check %q: a name and a check function are required", c.Name)
		}
	}
	if cfg.ReadinessInterval <= 0 {
		cfg.ReadinessInterval = DefaultReadinessInterval
	}
	if cfg.ReadinessTimeout <= 0 {
		cfg.ReadinessTimeout = DefaultReadinessTimeout
	}
	validator, err := protovalidate.New()
	if err != nil {
		return nil, fmt.Errorf("build request validator: %w", err)
	}
	s := &Server{cfg: cfg, health: health.NewServer()}
	s.stopping, s.stopStreams = context.WithCancel(context.Background())
	opts := append(s.interceptors(validator), grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize))
	if streams := maxConcurrentStreams(cfg.MaxConcurrentStreams); streams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(streams))
	}
	opts = append(opts, keepaliveOptions(cfg)...)
	if cfg.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(cfg.TLS)))
	}
	if cfg.StatsHandler != nil {
		opts = append(opts, grpc.StatsHandler(cfg.StatsHandler))
	}
	s.grpc = grpc.NewServer(append(opts, cfg.Options...)...)
	for _, r := range register {
		r(s.grpc)
	}
	healthpb.RegisterHealthServer(s.grpc, s.health)
	if cfg.Reflection {
		reflection.Register(s.grpc)
	}
	if cfg.Metrics != nil {
		cfg.Metrics.InitializeServer(s.grpc)
	}
	for name := range s.grpc.GetServiceInfo() {
		s.services = append(s.services, name)
	}
	// Not ready until the dependencies have been checked once.
	s.readiness = newReadiness(s)
	s.setServing(s.readiness.ready)
	s.health.SetServingStatus(LivenessService, healthpb.HealthCheckResponse_SERVING)
	return s, nil
}

// maxConcurrentStreams is the per-connection stream bound for n (see
// Config.MaxConcurrentStreams); 0 means none.
func maxConcurrentStreams(n int) uint32 {
	switch {
	case n == 0:
		return DefaultMaxConcurrentStreams
	case n < 0:
		return 0
	}
	return uint32(min(n, math.MaxUint32))
}

// keepaliveOptions are the connection management options. A negative age
// or grace means "forever", gRPC's own default.
func keepaliveOptions(cfg Config) []grpc.ServerOption {
	orDefault := func(v, def time.Duration) time.Duration {
		switch {
		case v == 0:
			return def
		case v < 0:
			return time.Duration(math.MaxInt64) // gRPC's "infinity"
		}
		return v
	}
	positive := func(v, def time.Duration) time.Duration {
		if v <= 0 {
			return def
		}
		return v
	}
	return []grpc.ServerOption{
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      orDefault(cfg.MaxConnectionAge, DefaultMaxConnectionAge),
			MaxConnectionAgeGrace: orDefault(cfg.MaxConnectionAgeGrace, DefaultMaxConnectionAgeGrace),
			Time:                  positive(cfg.KeepaliveTime, DefaultKeepaliveTime),
			Timeout:               positive(cfg.KeepaliveTimeout, DefaultKeepaliveTimeout),
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             positive(cfg.KeepaliveMinTime, DefaultKeepaliveMinTime),
			PermitWithoutStream: true,
		}),
	}
}

// setServing sets the health status of "" and of every registered service.
func (s *Server) setServing(ok bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if ok {
		st = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus("", st)
	for _, name := range s.services {
		s.health.SetServingStatus(name, st)
	}
}

// interceptors is the one interceptor chain, outermost first: the request id
// (so every log line and audit event of a call carries it), the metrics
// (when configured: they see every call's final code and full latency,
// rejections by authorization and validation included), logging records
// each call's outcome (never its payload), recovery turns panics into
// INTERNAL (inside logging, so a panicked call is logged like any other), a
// default deadline for unary calls and, for streams, their end at shutdown
// (endStreams), then the caller-specific interceptors (identity,
// authorization, audit, rate limits), and validation rejects bad input
// before any handler runs.
func (s *Server) interceptors(v protovalidate.Validator) []grpc.ServerOption {
	logger := logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		s.cfg.Logger.Log(ctx, slog.Level(lvl), msg, fields...)
	})
	logOpts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithFieldsFromContext(func(ctx context.Context) logging.Fields {
			fields := logging.Fields{"request_id", requestid.FromContext(ctx)}
			if p, ok := authn.FromContext(ctx); ok {
				fields = append(fields, "principal", p.Name)
			}
			return fields
		}),
	}
	recoverOpts := []recovery.Option{recovery.WithRecoveryHandlerContext(func(ctx context.Context, p any) error {
		s.cfg.Logger.ErrorContext(ctx, "panic in handler", "panic_type", fmt.Sprintf("%T", p))
		return status.Error(codes.Internal, "internal error")
	})}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(slices.Concat(
			[]grpc.UnaryServerInterceptor{requestid.UnaryServerInterceptor()},
			s.metricsUnary(),
			[]grpc.UnaryServerInterceptor{
				selector.UnaryServerInterceptor(logging.UnaryServerInterceptor(logger, logOpts...), notHealth),
				recovery.UnaryServerInterceptor(recoverOpts...),
				defaultDeadline(s.cfg.DefaultDeadline),
			},
			s.cfg.Unary,
			[]grpc.UnaryServerInterceptor{validateUnary(v)},
		)...),
		grpc.ChainStreamInterceptor(slices.Concat(
			[]grpc.StreamServerInterceptor{requestid.StreamServerInterceptor()},
			s.metricsStream(),
			[]grpc.StreamServerInterceptor{
				selector.StreamServerInterceptor(logging.StreamServerInterceptor(logger, logOpts...), notHealth),
				recovery.StreamServerInterceptor(recoverOpts...),
				s.endStreams,
			},
			s.cfg.Stream,
			[]grpc.StreamServerInterceptor{validateStream(v)},
		)...),
	}
}

func (s *Server) metricsUnary() []grpc.UnaryServerInterceptor {
	if s.cfg.Metrics == nil {
		return nil
	}
	return []grpc.UnaryServerInterceptor{s.cfg.Metrics.UnaryServerInterceptor()}
}

func (s *Server) metricsStream() []grpc.StreamServerInterceptor {
	if s.cfg.Metrics == nil {
		return nil
	}
	return []grpc.StreamServerInterceptor{s.cfg.Metrics.StreamServerInterceptor()}
}

// defaultDeadline gives a unary call without a deadline one, so no call can
// hold resources forever. Streams (WatchPositions) are long-lived on purpose.
func defaultDeadline(d time.Duration) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		return handler(ctx, req)
	}
}

// GRPC returns the underlying server, e.g. to serve on a bufconn listener.
func (s *Server) GRPC() *grpc.Server { return s.grpc }

// Serve listens on cfg.Listen and serves until ctx is done, then drains.
func (s *Server) Serve(ctx context.Context) error {
	lis, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.cfg.Listen, err)
	}
	return s.ServeListener(ctx, lis)
}

// ServeListener serves on lis until ctx is done, then shuts down in three
// steps:
//
//  1. Drain: health reports NOT_SERVING for every service but
//     LivenessService, and the server keeps serving, new connections and
//     calls included, for DrainPeriod, so balancers that watch health move
//     traffic away before anything is refused.
//  2. Stop: the listener closes, every connection gets GOAWAY (clients
//     reconnect elsewhere), and open streams — WatchPositions, health
//     Watch — end with UNAVAILABLE so their clients re-subscribe elsewhere
//     instead of holding the shutdown.
//  3. Grace: unary calls in flight get up to GracePeriod to finish; the
//     rest are cut.
//
// With readiness checks, they run while serving (see Config.Readiness).
func (s *Server) ServeListener(ctx context.Context, lis net.Listener) error {
	s.cfg.Logger.Info("grpc server listening", "addr", lis.Addr().String())
	readinessCtx, stopReadiness := context.WithCancel(ctx)
	readinessDone := make(chan struct{})
	go func() { defer close(readinessDone); s.readiness.run(readinessCtx) }()
	defer func() { stopReadiness(); <-readinessDone }()
	closing := &notifyClose{Listener: lis, closed: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(closing) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc serve: %w", err)
	case <-ctx.Done():
	}
	// Stop the checks before health goes NOT_SERVING for good, so a check
	// finishing late cannot report SERVING during the drain.
	stopReadiness()
	<-readinessDone
	serveErr := s.drain(errc)
	s.stop(closing.closed)
	if serveErr == nil {
		serveErr = <-errc
	}
	if serveErr != nil && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return fmt.Errorf("grpc serve: %w", serveErr)
	}
	s.cfg.Logger.Info("grpc server stopped")
	return nil
}

// drain reports NOT_SERVING and keeps serving for DrainPeriod. It returns
// early, with Serve's error, if Serve fails meanwhile.
func (s *Server) drain(errc <-chan error) error {
	s.setServing(false)
	if s.cfg.DrainPeriod <= 0 {
		return nil
	}
	s.cfg.Logger.Info("draining: health reports NOT_SERVING, calls are still served", "drain_period", s.cfg.DrainPeriod)
	t := time.NewTimer(s.cfg.DrainPeriod)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case err := <-errc:
		return cmp.Or(err, grpc.ErrServerStopped)
	}
}

// stop refuses new calls, ends open streams and waits up to GracePeriod
// for the calls in flight. listenerClosed is closed when GracefulStop has
// closed the listener.
func (s *Server) stop(listenerClosed <-chan struct{}) {
	s.cfg.Logger.Info("stopping: no new calls; in-flight calls get the grace period", "grace", s.cfg.GracePeriod)
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	// GracefulStop closes the listener right before it sends GOAWAY on
	// every connection: streams ended after that send their clients to new
	// connections (another replica), rarely back to this server.
	select {
	case <-listenerClosed:
	case <-stopped:
	}
	s.stopStreams()
	grace := time.NewTimer(s.cfg.GracePeriod)
	defer grace.Stop()
	select {
	case <-stopped:
	case <-grace.C:
		s.cfg.Logger.Warn("grace period over, closing remaining calls", "grace", s.cfg.GracePeriod)
		// Stop closes every connection; a handler that ignores its
		// context may still run, but nothing waits for it.
		s.grpc.Stop()
	}
}

// notifyClose closes closed when the listener is closed.
type notifyClose struct {
	net.Listener
	once   sync.Once
	closed chan struct{}
}

func (l *notifyClose) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// errStopping is the cause with which endStreams ends a stream.
var errStopping = errors.New("server stopping")

// endStreams gives each stream a context that ends when the server stops
// accepting calls, and turns the stream's end into UNAVAILABLE, which
// tells the client to reconnect (to another replica, after the GOAWAY).
// Without it one open WatchPositions or health Watch stream would hold
// shutdown for the whole grace period.
func (s *Server) endStreams(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, cancel := context.WithCancelCause(ss.Context())
	defer cancel(nil)
	defer context.AfterFunc(s.stopping, func() { cancel(errStopping) })()
	err := handler(srv, &middleware.WrappedServerStream{ServerStream: ss, WrappedContext: ctx})
	if err != nil && errors.Is(context.Cause(ctx), errStopping) {
		return status.Error(codes.Unavailable, "server is shutting down; reconnect")
	}
	return err
}

// notHealth leaves health checks out of the call log: probes call them
// every few seconds per pod and would drown the calls that matter.
var notHealth = selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
	return c.Service != healthpb.Health_ServiceDesc.ServiceName
})
