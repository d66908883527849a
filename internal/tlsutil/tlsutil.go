// Package tlsutil builds the TLS configurations of fleetbroker's gRPC
// servers and clients from PEM files, and keeps them current: certificates,
// keys and the client CA are re-read when their files change, so a rotated
// certificate (cert-manager, a Kubernetes secret, an editor) takes effect
// for new handshakes without a restart. A file that fails to load keeps the
// last good material in use.
//
// Only TLS 1.3 is offered. The package logs file paths, certificate expiry
// and errors; it never logs file contents, so key material cannot reach a
// log line.
package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/fleetbroker/fleetbroker/internal/filewatch"
)

// Files names the PEM files of one TLS identity.
type Files struct {
	// CertFile is the certificate chain, leaf first.
	CertFile string
	// KeyFile is the private key of the leaf.
	KeyFile string
	// CAFile holds the CA certificates to trust: on a server, the CAs that
	// sign client certificates (setting it makes client certificates
	// required); on a client, the CAs that sign the server's certificate.
	CAFile string
	// ClientCertOptional (servers with CAFile): verify a client certificate
	// when one is presented, but let clients without one connect, so they
	// can authenticate by API key and health probes can reach the server.
	// The server must then refuse calls that carry no identity.
	ClientCertOptional bool
}

// NewServerConfig returns a TLS 1.3 server configuration serving the
// certificate in f.CertFile and f.KeyFile. When f.CAFile is set, every client
// must present a certificate that verifies against it (mutual TLS). The
// certificate, key and CA are reloaded when their files change; Close the
// Reloader when the server is done.
func NewServerConfig(f Files, logger *slog.Logger) (*Reloader, *tls.Config, error) {
	return newServerConfig(f, logger, filewatch.Default)
}

func newServerConfig(f Files, logger *slog.Logger, w filewatch.Options) (*Reloader, *tls.Config, error) {
	if f.CertFile == "" || f.KeyFile == "" {
		return nil, nil, errors.New("tls server: certificate and key files are required")
	}
	var clientCAs *material[x509.CertPool]
	if f.CAFile != "" {
		clientCAs = newCAMaterial(f.CAFile)
	}
	r, err := newReloader(logger, w, newKeyPairMaterial(f.CertFile, f.KeyFile), clientCAs)
	if err != nil {
		return nil, nil, fmt.Errorf("tls server: %w", err)
	}
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return r.keyPair.current(), nil },
	}
	if f.CAFile != "" {
		requireClientCerts(cfg, r)
		if f.ClientCertOptional {
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}
	return r, cfg, nil
}

// requireClientCerts makes cfg demand a client certificate signed by the
// Reloader's current CA. ClientCAs cannot be swapped in place while
// handshakes read it, so each handshake gets a copy of cfg carrying the CA
// pool of the moment: a rotated CA applies to the next connection.
func requireClientCerts(cfg *tls.Config, r *Reloader) {
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	// Fail closed: were GetConfigForClient ever bypassed, an empty pool
	// rejects every client, where a nil one would trust the system roots.
	cfg.ClientCAs = x509.NewCertPool()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		// cfg itself, not a snapshot, so options set on it after
		// construction (ALPN, session tickets) still apply.
		c := cfg.Clone()
		c.ClientCAs = r.clientCAs.current()
		return c, nil
	}
}

// NewClientConfig returns a TLS 1.3 client configuration that trusts the CAs
// in f.CAFile (the system roots when it is empty) and checks the server's
// certificate against serverName (when empty, gRPC uses the dialled host).
// When f.CertFile and f.KeyFile are set, it presents that certificate to
// servers that ask for one (mutual TLS), reloading it when the files change.
//
// The trusted CAs are read once: a client picks up a rotated server CA on
// restart, so rotate by adding the new CA to the bundle first.
func NewClientConfig(f Files, serverName string, logger *slog.Logger) (*Reloader, *tls.Config, error) {
	return newClientConfig(f, serverName, logger, filewatch.Default)
}

func newClientConfig(f Files, serverName string, logger *slog.Logger, w filewatch.Options) (*Reloader, *tls.Config, error) {
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, nil, errors.New("tls client: set both the certificate and the key file, or neither")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: serverName}
	if f.CAFile != "" {
		roots, err := loadCAs(f.CAFile)
		if err != nil {
			return nil, nil, fmt.Errorf("tls client: %w", err)
		}
		cfg.RootCAs = roots
	}
	var keyPair *material[tls.Certificate]
	if f.CertFile != "" {
		keyPair = newKeyPairMaterial(f.CertFile, f.KeyFile)
	}
	r, err := newReloader(logger, w, keyPair, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("tls client: %w", err)
	}
	if f.CertFile != "" {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return r.keyPair.current(), nil
		}
	}
	return r, cfg, nil
}

func loadCAs(caFile string) (*x509.CertPool, error) {
	data, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool, err := parseCAs(data)
	if err != nil {
		return nil, fmt.Errorf("load CAs from %s: %w", caFile, err)
	}
	return pool, nil
}

// StaticClientConfig is a client TLS configuration read once from f (CA
// bundle and, optionally, client certificate and key), for a client that
// lives for one call (fleetbroker probe) or whose library takes a fixed
// configuration (the Redis client). Without f.CAFile the system roots are
// trusted. Errors name the file at fault, never its contents.
func StaticClientConfig(f Files, serverName string, minVersion uint16) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: minVersion, ServerName: serverName}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CA: no PEM certificate in %s", f.CAFile)
		}
	}
	if f.CertFile != "" || f.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
