package telemetry

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/httpserve"
)

// Timeouts of the metrics listener. A scrape is one small GET; anything
// slower is a stuck or hostile client, and must not hold a connection.
const (
	metricsReadHeaderTimeout = 5 * time.Second
	metricsReadTimeout       = 10 * time.Second
	metricsWriteTimeout      = 30 * time.Second
	metricsIdleTimeout       = 2 * time.Minute
)

// Serve serves h over plain HTTP on addr (--metrics-listen, e.g. ":9090")
// until ctx is done, then shuts down gracefully. It is a separate listener
// so that metrics never share the gRPC port, its TLS and its caller
// authentication: scrape it from inside the cluster only (it carries no
// secrets, but it does show traffic). A listen error is returned at once.
func Serve(ctx context.Context, addr string, h http.Handler, logger *slog.Logger) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	return ServeListener(ctx, lis, h, logger)
}

// ServeListener is Serve on a listener the caller opened.
func ServeListener(ctx context.Context, lis net.Listener, h http.Handler, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.Default()
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: metricsReadHeaderTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	logger.Info("metrics listening", "addr", lis.Addr().String())
	if err := httpserve.Serve(ctx, srv, lis); err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	logger.Info("metrics server stopped")
	return nil
}
