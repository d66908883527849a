package tlsutil

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/fleetbroker/fleetbroker/internal/filewatch"
)

// Reloader keeps the TLS material of a configuration from NewServerConfig or
// NewClientConfig in step with its files until Close.
type Reloader struct {
	logger    *slog.Logger
	keyPair   *material[tls.Certificate] // nil on a client without a certificate
	clientCAs *material[x509.CertPool]   // nil unless a server verifies clients
	files     *filewatch.Watcher         // nil when there is nothing to watch
}

// newReloader loads every material once, failing if any does not load, and
// then watches their files. Either material may be nil.
func newReloader(logger *slog.Logger, w filewatch.Options, keyPair *material[tls.Certificate], clientCAs *material[x509.CertPool]) (*Reloader, error) {
	if logger == nil {
		logger = slog.Default()
	}
	r := &Reloader{
		logger:    logger,
		keyPair:   keyPair,
		clientCAs: clientCAs,
	}
	for _, m := range r.materials() {
		if _, err := m.refresh(); err != nil {
			return nil, fmt.Errorf("load %s from %v: %w", m.kind(), m.files(), err)
		}
	}
	var files []string
	for _, m := range r.materials() {
		files = append(files, m.files()...)
	}
	if len(files) == 0 {
		return r, nil // nothing to watch
	}
	// Every check re-reads the files; it is cheap, and reloads only what
	// changed (see refreshAll).
	r.files = filewatch.Start(files, w, logger, "tls", func(bool) { r.refreshAll() })
	return r, nil
}

// Close stops watching the files. The configuration keeps serving the
// material loaded last. Close may be called more than once.
func (r *Reloader) Close() error {
	if r.files == nil {
		return nil
	}
	return r.files.Close()
}

// refresher is a material of any type, for the loop that refreshes them all.
type refresher interface {
	refresh() (changed bool, err error)
	kind() string
	files() []string
	describe() []any
}

func (r *Reloader) materials() []refresher {
	var ms []refresher
	if r.keyPair != nil {
		ms = append(ms, r.keyPair)
	}
	if r.clientCAs != nil {
		ms = append(ms, r.clientCAs)
	}
	return ms
}

// refreshAll reloads whatever changed. A failure keeps the material in use
// and is logged once per distinct content of the files, not on every poll.
func (r *Reloader) refreshAll() {
	for _, m := range r.materials() {
		changed, err := m.refresh()
		switch {
		case !changed:
		case err != nil:
			r.logger.Error("tls: reload failed, keeping the previous "+m.kind(), "files", m.files(), "error", err)
		default:
			r.logger.Info("tls: reloaded "+m.kind(), append([]any{"files", m.files()}, m.describe()...)...)
		}
	}
}

// material is one piece of TLS material read from files. Handshakes read
// the current value concurrently; only the Reloader (its constructor, then
// its goroutine) refreshes it.
type material[T any] struct {
	name   string
	paths  []string
	parse  func(contents [][]byte) (*T, error)
	attrs  func(*T) []any // log attributes of a value; never secrets
	value  atomic.Pointer[T]
	digest [sha256.Size]byte // of the contents last read, or of the read error
}

func (m *material[T]) kind() string    { return m.name }
func (m *material[T]) files() []string { return m.paths }
func (m *material[T]) current() *T     { return m.value.Load() }

func (m *material[T]) describe() []any {
	if m.attrs == nil {
		return nil
	}
	return m.attrs(m.current())
}

// refresh reads the files and, if their contents differ from the last read,
// parses and stores them. It compares contents rather than modification
// times, which have coarse granularity and change on a mere touch.
func (m *material[T]) refresh() (changed bool, err error) {
	contents, digest, err := readFiles(m.paths)
	if digest == m.digest {
		return false, nil
	}
	m.digest = digest
	if err != nil {
		return true, err
	}
	v, err := m.parse(contents)
	if err != nil {
		return true, err
	}
	m.value.Store(v)
	return true, nil
}

// readFiles returns the files' contents and a digest of them. When a file
// cannot be read the digest covers the error instead, so the same failure is
// reported once.
func readFiles(paths []string) ([][]byte, [sha256.Size]byte, error) {
	h := sha256.New()
	contents := make([][]byte, 0, len(paths))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			h.Write([]byte("read error: " + err.Error()))
			return nil, [sha256.Size]byte(h.Sum(nil)), err
		}
		// Length-prefixed, so moving bytes between files changes the digest.
		h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
		h.Write(b)
		contents = append(contents, b)
	}
	return contents, [sha256.Size]byte(h.Sum(nil)), nil
}

func newKeyPairMaterial(certFile, keyFile string) *material[tls.Certificate] {
	return &material[tls.Certificate]{
		name:  "certificate",
		paths: []string{certFile, keyFile},
		parse: func(c [][]byte) (*tls.Certificate, error) { return parseKeyPair(c[0], c[1]) },
		attrs: func(c *tls.Certificate) []any {
			return []any{"subject", c.Leaf.Subject.String(), "not_after", c.Leaf.NotAfter}
		},
	}
}

func newCAMaterial(caFile string) *material[x509.CertPool] {
	return &material[x509.CertPool]{
		name:  "client CA",
		paths: []string{caFile},
		parse: func(c [][]byte) (*x509.CertPool, error) { return parseCAs(c[0]) },
	}
}

// parseKeyPair also checks that the key belongs to the certificate, so a
// certificate rotated before its key is refused until the key follows. The
// standard library's errors name what is wrong, never the key's bytes.
func parseKeyPair(certPEM, keyPEM []byte) (*tls.Certificate, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	if cert.Leaf == nil { // set by X509KeyPair since Go 1.23; kept for safety
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, err
		}
	}
	return &cert, nil
}

// parseCAs is stricter than CertPool.AppendCertsFromPEM, which skips what
// it cannot parse: a half-written bundle must fail as a whole, not silently
// trust fewer CAs.
func parseCAs(data []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for rest := data; ; n++ {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			if len(bytes.TrimSpace(rest)) != 0 {
				return nil, errors.New("CA bundle has data that is not a PEM block (truncated file?)")
			}
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("CA bundle holds a %q PEM block, want only CERTIFICATE", block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CA certificate %d: %w", n+1, err)
		}
		pool.AddCert(cert)
	}
	if n == 0 {
		return nil, errors.New("CA bundle holds no certificate")
	}
	return pool, nil
}
