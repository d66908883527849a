package app

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// AuthorizeConfig configures the Wialon authorization flow of the
// credentials service: StartWialonAuthorization and the HTTP callback it
// sends browsers to, served on a listener of its own.
type AuthorizeConfig struct {
	// Listen is the callback listener's address; empty turns the flow off.
	Listen string
	// Listener, if set, is served instead of listening on Listen (tests and
	// dev, which must know the port before building).
	Listener net.Listener
	// PublicURL is the callback listener as browsers reach it (through the
	// ingress), e.g. https://connect.example.com.
	PublicURL string
	// ReturnURLs is the comma-separated allow-list of return URLs.
	ReturnURLs string
	// ClientID, AccessType ("0x100", "0x300", "-1") and AllowFullAccess are
	// what is asked of Wialon; LoginURL is hosted Wialon's login.html.
	ClientID        string
	AccessType      string
	AllowFullAccess bool
	LoginURL        string
	// TLSCert and TLSKey serve the callback over TLS; empty means the gRPC
	// port's --tls-cert and --tls-key (without client certificates: the
	// callers are browsers, through the ingress). Plaintext only with
	// --insecure.
	TLSCert, TLSKey string
}

func (a AuthorizeConfig) enabled() bool { return a.Listen != "" || a.Listener != nil }

// EventsConfig configures credential events and the periodic credential
// check.
type EventsConfig struct {
	// ExpiryWarning is how long before a token expires its EXPIRING event
	// is published.
	ExpiryWarning time.Duration
	// CheckInterval is how often stored credentials are checked for it and
	// counted for the metrics.
	CheckInterval time.Duration
}

// connectAndEvents builds the authorization flow's and the events'
// configuration; both need the Redis client BuildCredentials opened (none:
// both off).
func (cfg CredentialsConfig) connectAndEvents(logger *slog.Logger) (*credentials.ConnectConfig, *credentials.Events, error) {
	if cfg.RedisClient == nil {
		return nil, nil, nil
	}
	var reg prometheus.Registerer
	if cfg.Metrics != nil {
		reg = cfg.Metrics.Registry()
	}
	events, err := credentials.NewEvents(credentials.EventsConfig{
		Client: cfg.RedisClient, Prefix: cfg.RedisPrefix, ExpiryWarning: cfg.Events.ExpiryWarning,
		CheckInterval: cfg.Events.CheckInterval, Registerer: reg, Logger: logger,
	})
	if err != nil {
		return nil, nil, err
	}
	a := cfg.Authorize
	if !a.enabled() {
		return nil, events, nil
	}
	returnURLs, err := credentials.ParseReturnURLs(a.ReturnURLs)
	if err != nil {
		return nil, nil, fmt.Errorf("--authorize-return-urls: %w", err)
	}
	return &credentials.ConnectConfig{
		Client: cfg.RedisClient, Prefix: cfg.RedisPrefix, PublicURL: a.PublicURL, ClientID: a.ClientID,
		AccessType: a.AccessType, AllowFullAccess: a.AllowFullAccess, ReturnURLs: returnURLs, LoginURL: a.LoginURL,
		Audit: cfg.Audit, Registerer: reg,
	}, events, nil
}

// CredentialsServers is what `fleetbroker credentials` serves: the gRPC
// server, and beside it the callback listener and the service's background
// work (ServeBeside).
type CredentialsServers struct {
	GRPC    *server.Server
	Service *credentials.Service
	// Authorize is the callback listener; nil when the flow is off.
	Authorize *AuthorizeServer
}

// ServeBeside runs everything but the gRPC port until ctx ends.
func (c *CredentialsServers) ServeBeside(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.Service.RunBackground(ctx) })
	if c.Authorize != nil {
		g.Go(func() error { return c.Authorize.Serve(ctx) })
	}
	return g.Wait()
}

// AuthorizeServer is the HTTP(S) listener of the authorization callback.
type AuthorizeServer struct {
	srv      *http.Server
	listen   string
	listener net.Listener
	tls      *tls.Config
	logger   *slog.Logger
}

// newAuthorizeServer serves handler with timeouts fit for a browser-facing
// page and no request log: the callback's URL holds a token. tlsCfg nil
// serves plaintext.
func newAuthorizeServer(a AuthorizeConfig, handler http.Handler, tlsCfg *tls.Config, logger *slog.Logger) *AuthorizeServer {
	return &AuthorizeServer{
		srv: &http.Server{
			Handler:           handler,
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       15 * time.Second,
			WriteTimeout:      45 * time.Second, // a callback takes up to 30 s
			IdleTimeout:       60 * time.Second,
			MaxHeaderBytes:    16 << 10,
			// net/http's own messages (TLS handshake errors) never quote a URL.
			ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		},
		listen: a.Listen, listener: a.Listener, tls: tlsCfg, logger: logger,
	}
}

// Serve serves until ctx ends, then shuts down within 5 s.
func (a *AuthorizeServer) Serve(ctx context.Context) error {
	lis := a.listener
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", a.listen); err != nil {
			return fmt.Errorf("--authorize-listen: listen on %s: %w", a.listen, err)
		}
	}
	a.logger.Info("wialon authorization callback listening", "addr", lis.Addr().String(), "tls", a.tls != nil)
	errc := make(chan error, 1)
	go func() {
		if a.tls != nil {
			a.srv.TLSConfig = a.tls.Clone()
			errc <- a.srv.ServeTLS(lis, "", "")
			return
		}
		errc <- a.srv.Serve(lis)
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// buildAuthorizeServer makes the callback listener of svc, with TLS like
// the gRPC port's (its own certificate, or the gRPC port's; plaintext only
// with --insecure), and pushes the certificate watcher's closer.
func buildAuthorizeServer(cfg CredentialsConfig, svc *credentials.Service, logger *slog.Logger, closers *closeStack) (*AuthorizeServer, error) {
	a := cfg.Authorize
	if !a.enabled() {
		return nil, nil
	}
	certFile, keyFile := a.TLSCert, a.TLSKey
	if certFile == "" && keyFile == "" {
		certFile, keyFile = cfg.Security.TLSCert, cfg.Security.TLSKey
	}
	var tlsCfg *tls.Config
	switch {
	case certFile != "" || keyFile != "":
		reloader, c, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: certFile, KeyFile: keyFile}, logger)
		if err != nil {
			return nil, fmt.Errorf("--authorize-tls-cert/--authorize-tls-key: %w", err)
		}
		closers.push(func() { _ = reloader.Close() })
		tlsCfg = c
	case !cfg.Security.Insecure:
		return nil, errors.New("refusing to serve the authorization callback in plaintext: set --authorize-tls-cert and --authorize-tls-key (or --tls-cert and --tls-key), or --insecure behind a proxy that terminates TLS")
	}
	return newAuthorizeServer(a, svc.AuthorizeHandler(), tlsCfg, logger), nil
}
