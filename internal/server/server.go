// Package server is the one gRPC server bootstrap shared by every
// fleetbroker subcommand: the credentials service, the gateway and `dev`
// differ only in which services they register, never in how interceptors,
// health, reflection and shutdown are wired.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"time"

	"buf.build/go/protovalidate"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// Config is what every fleetbroker gRPC server shares.
type Config struct {
	// Listen is the TCP address to serve on, e.g. ":7401".
	Listen string
	// Reflection registers the gRPC reflection service (for grpcurl).
	Reflection bool
	// GracePeriod bounds how long shutdown waits for in-flight calls.
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
	// Unary and Stream run after recovery and before validation: identity,
	// authorization, audit and rate limits.
	Unary  []grpc.UnaryServerInterceptor
	Stream []grpc.StreamServerInterceptor
	// Options are appended to the server options.
	Options []grpc.ServerOption
}

// Server is a gRPC server with health, reflection and the standard
// interceptor chain.
type Server struct {
	cfg    Config
	grpc   *grpc.Server
	health *health.Server
}

// New builds a server and lets each register func add its services.
func New(cfg Config, register ...func(*grpc.Server)) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.GracePeriod <= 0 {
		cfg.GracePeriod = 10 * time.Second
	}
	if cfg.DefaultDeadline <= 0 {
		cfg.DefaultDeadline = 30 * time.Second
	}
	if cfg.MaxRecvMsgSize <= 0 {
		cfg.MaxRecvMsgSize = 1 << 20
	}
	if cfg.TLS == nil && !cfg.Insecure {
		return nil, fmt.Errorf("refusing to serve plaintext: set --tls-cert and --tls-key, or --insecure behind a sidecar that terminates mTLS")
	}
	if cfg.TLS == nil {
		cfg.Logger.Warn("serving plaintext gRPC without TLS: only safe behind a sidecar that terminates mTLS, or in dev")
	}
	validator, err := protovalidate.New()
	if err != nil {
		return nil, fmt.Errorf("build request validator: %w", err)
	}
	s := &Server{cfg: cfg, health: health.NewServer()}
	opts := append(s.interceptors(validator), grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize))
	if cfg.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(cfg.TLS)))
	}
	s.grpc = grpc.NewServer(append(opts, cfg.Options...)...)
	for _, r := range register {
		r(s.grpc)
	}
	healthpb.RegisterHealthServer(s.grpc, s.health)
	if cfg.Reflection {
		reflection.Register(s.grpc)
	}
	for name := range s.grpc.GetServiceInfo() {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	return s, nil
}

// interceptors is the one interceptor chain, outermost first: the request id
// (so every log line and audit event of a call carries it), logging records
// each call's outcome (never its payload), recovery turns panics into
// INTERNAL (inside logging, so a panicked call is logged like any other), a
// default deadline, then the caller-specific interceptors (identity,
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
			[]grpc.UnaryServerInterceptor{
				requestid.UnaryServerInterceptor(),
				logging.UnaryServerInterceptor(logger, logOpts...),
				recovery.UnaryServerInterceptor(recoverOpts...),
				defaultDeadline(s.cfg.DefaultDeadline),
			},
			s.cfg.Unary,
			[]grpc.UnaryServerInterceptor{validateUnary(v)},
		)...),
		grpc.ChainStreamInterceptor(slices.Concat(
			[]grpc.StreamServerInterceptor{
				requestid.StreamServerInterceptor(),
				logging.StreamServerInterceptor(logger, logOpts...),
				recovery.StreamServerInterceptor(recoverOpts...),
			},
			s.cfg.Stream,
			[]grpc.StreamServerInterceptor{validateStream(v)},
		)...),
	}
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

// ServeListener serves on lis until ctx is done. Shutdown first reports
// NOT_SERVING on health (so load balancers stop sending), then waits up to
// the grace period for in-flight calls before cutting the rest.
func (s *Server) ServeListener(ctx context.Context, lis net.Listener) error {
	s.cfg.Logger.Info("grpc server listening", "addr", lis.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- s.grpc.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc serve: %w", err)
	case <-ctx.Done():
	}
	s.health.Shutdown()
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(s.cfg.GracePeriod):
		s.cfg.Logger.Warn("grace period over, closing remaining calls", "grace", s.cfg.GracePeriod)
		s.grpc.Stop()
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("grpc serve: %w", err)
	}
	s.cfg.Logger.Info("grpc server stopped")
	return nil
}
