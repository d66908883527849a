// Package httpserve runs an http.Server until its context ends and then
// stops it within a bound: the one way fleetbroker's HTTP listeners (the
// metrics listener, the Wialon authorization callback, the simulator)
// start and stop. It never logs a request: the callback's URLs hold tokens.
package httpserve

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"
)

// DefaultShutdownTimeout is how long requests still running at shutdown
// may finish before their connections are cut.
const DefaultShutdownTimeout = 5 * time.Second

// Serve serves srv on lis — over TLS when srv.TLSConfig is set, with its
// certificates — until ctx is done, then shuts srv down: requests still
// running get DefaultShutdownTimeout, then their connections are closed. A
// serve error (a closed listener, say) is returned at once.
func Serve(ctx context.Context, srv *http.Server, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() {
		if srv.TLSConfig != nil {
			errc <- srv.ServeTLS(lis, "", "")
			return
		}
		errc <- srv.Serve(lis)
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), DefaultShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	if err != nil {
		_ = srv.Close() // requests still running after the timeout: cut them
	}
	if serveErr := <-errc; !errors.Is(serveErr, http.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return err
}
