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

	"github.com/fleetbroker/fleetbroker/internal/httpserve"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// AuthorizeConfig configures the Wialon authorization flow of the
// credentials service: StartWialonAuthorization and the HTTP callback it
// sends browsers to, served on a listener of its own.
type AuthorizeConfig struct {
	// Listen is the callback listener's address; empty turns the flow off
	// (unless Deps.AuthorizeListener is given).
	Listen string
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

func (a AuthorizeConfig) enabled(d Deps) bool { return a.Listen != "" || d.AuthorizeListener != nil }

// validate checks the flow's settings when it is on (listener: a listener
// is given): the URLs, the rights asked for, and TLS or --insecure.
func (a AuthorizeConfig) validate(sec SecurityConfig, listener bool) error {
	if a.Listen == "" && !listener {
		return nil
	}
	var p problems
	if urls, err := credentials.ParseReturnURLs(a.ReturnURLs); err != nil {
		p.add(fmt.Errorf("--authorize-return-urls: %w", err))
	} else if urls.Len() == 0 {
		p.add(errors.New("--authorize-return-urls is required with --authorize-listen: the pages a finished flow may send the browser to"))
	}
	if _, err := credentials.ParsePublicURL(a.PublicURL); err != nil {
		p.add(fmt.Errorf("--public-url: %w", err))
	}
	if _, err := wialon.ParseRights(a.AccessType, a.AllowFullAccess); err != nil {
		p.add(fmt.Errorf("--wialon-access-type: %w", err))
	}
	if (a.TLSCert == "") != (a.TLSKey == "") {
		p.add(errors.New("--authorize-tls-cert and --authorize-tls-key go together"))
	}
	if a.TLSCert == "" && sec.TLSCert == "" && !sec.Insecure {
		p.add(errPlaintextCallback)
	}
	return p.err()
}

var errPlaintextCallback = errors.New("refusing to serve the authorization callback in plaintext: set --authorize-tls-cert and --authorize-tls-key (or --tls-cert and --tls-key), or --insecure behind a proxy that terminates TLS")

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

// SetDefaults fills the settings left empty.
func (e *EventsConfig) SetDefaults() {
	if e.ExpiryWarning <= 0 {
		e.ExpiryWarning = credentials.DefaultExpiryWarning
	}
	if e.CheckInterval <= 0 {
		e.CheckInterval = credentials.DefaultCredentialCheckInt
	}
}

// AuthorizeServer is the HTTP(S) listener of the authorization callback.
type AuthorizeServer struct {
	srv      *http.Server
	listen   string
	listener net.Listener
	logger   *slog.Logger
}

// newAuthorizeServer serves handler with timeouts fit for a browser-facing
// page and no request log: the callback's URL holds a token. tlsCfg nil
// serves plaintext; lis nil listens on listen when served.
func newAuthorizeServer(listen string, lis net.Listener, handler http.Handler, tlsCfg *tls.Config, logger *slog.Logger) *AuthorizeServer {
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      45 * time.Second, // a callback takes up to 30 s
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		// net/http's own messages (TLS handshake errors) never quote a URL.
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	if tlsCfg != nil {
		srv.TLSConfig = tlsCfg.Clone()
	}
	return &AuthorizeServer{srv: srv, listen: listen, listener: lis, logger: logger}
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
	a.logger.Info("wialon authorization callback listening", "addr", lis.Addr().String(), "tls", a.srv.TLSConfig != nil)
	return httpserve.Serve(ctx, a.srv, lis)
}

// authorizeServer makes the callback listener of svc, with TLS like the
// gRPC port's (its own certificate, or the gRPC port's; plaintext only
// with --insecure), and pushes the certificate watcher's closer. It is nil
// when the flow is off.
func (b *builder) authorizeServer(cfg CredentialsConfig, svc *credentials.Service) (*AuthorizeServer, error) {
	a := cfg.Authorize
	if !a.enabled(b.d) {
		return nil, nil
	}
	certFile, keyFile := a.TLSCert, a.TLSKey
	if certFile == "" && keyFile == "" {
		certFile, keyFile = cfg.Security.TLSCert, cfg.Security.TLSKey
	}
	var tlsCfg *tls.Config
	switch {
	case certFile != "" || keyFile != "":
		reloader, c, err := tlsutil.NewServerConfig(tlsutil.Files{CertFile: certFile, KeyFile: keyFile}, b.logger)
		if err != nil {
			return nil, fmt.Errorf("--authorize-tls-cert/--authorize-tls-key: %w", err)
		}
		b.closers.pushCloser(reloader)
		tlsCfg = c
	case !cfg.Security.Insecure:
		return nil, errPlaintextCallback
	}
	handler := svc.AuthorizeHandler()
	if b.authorizeHandler != nil {
		handler = b.authorizeHandler(handler)
	}
	return newAuthorizeServer(a.Listen, b.d.AuthorizeListener, handler, tlsCfg, b.logger), nil
}
