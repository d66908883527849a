package tlsutil_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
)

// reloadDeadline bounds every wait for a reload. It is below the 5 s fallback
// poll, so these tests pass only if file notifications work.
const reloadDeadline = 3 * time.Second

func TestServerConfigHandshake(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	addr := startServer(t, tlsutil.Files{CertFile: cert, KeyFile: key}, nil)

	got, err := dial(addr, clientConfig(t, tlsutil.Files{CAFile: pki.CAFile()}))
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if want := serialOf(t, cert); got.server != want {
		t.Errorf("server presented serial %s, want %s", got.server, want)
	}
	if got.version != tls.VersionTLS13 {
		t.Errorf("negotiated %s, want TLS 1.3", tls.VersionName(got.version))
	}
	if got.seen != "-" {
		t.Errorf("server without a client CA verified client %q, want none", got.seen)
	}
}

func TestServerConfigRefusesTLS12(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	addr := startServer(t, tlsutil.Files{CertFile: cert, KeyFile: key}, nil)

	cfg := clientConfig(t, tlsutil.Files{CAFile: pki.CAFile()})
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	if _, err := dial(addr, cfg); err == nil {
		t.Fatal("TLS 1.2 handshake succeeded, want it refused")
	}
}

// TestServerReloadsRotatedCertificate replaces the files the ways they are
// replaced in production, and expects the new certificate on the next
// handshake without a restart.
func TestServerReloadsRotatedCertificate(t *testing.T) {
	tests := []struct {
		name string
		// setup issues the first certificate and returns its files and a
		// function that rotates it, returning the new certificate's serial.
		setup func(t *testing.T, pki *testenv.PKI) (tlsutil.Files, func() string)
	}{
		{"renamed over (editors, atomic writers)", func(t *testing.T, pki *testenv.PKI) (tlsutil.Files, func() string) {
			cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
			return tlsutil.Files{CertFile: cert, KeyFile: key}, func() string {
				pki.Issue(t, "server", testenv.IssueOptions{Server: true})
				return serialOf(t, cert)
			}
		}},
		{"rewritten in place, certificate before key", func(t *testing.T, pki *testenv.PKI) (tlsutil.Files, func() string) {
			dir := t.TempDir()
			files := tlsutil.Files{CertFile: filepath.Join(dir, "tls.crt"), KeyFile: filepath.Join(dir, "tls.key")}
			copyPair(t, pki, "v1", files)
			return files, func() string {
				copyPair(t, pki, "v2", files)
				return serialOf(t, files.CertFile)
			}
		}},
		{"kubernetes secret volume (symlinked directory swap)", func(t *testing.T, pki *testenv.PKI) (tlsutil.Files, func() string) {
			vol := newSecretVolume(t)
			vol.publish(t, pki, "v1")
			return vol.files(), func() string {
				vol.publish(t, pki, "v2")
				return serialOf(t, vol.files().CertFile)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pki := testenv.NewPKI(t)
			files, rotate := tt.setup(t, pki)
			addr := startServer(t, files, nil)
			client := clientConfig(t, tlsutil.Files{CAFile: pki.CAFile()})
			before := serialOf(t, files.CertFile)
			if got := mustDial(t, addr, client).server; got != before {
				t.Fatalf("server presented serial %s before rotation, want %s", got, before)
			}

			after := rotate()
			if after == before {
				t.Fatalf("rotation left serial %s on disk", before)
			}
			eventually(t, "server presents the rotated certificate", func() bool {
				return mustDial(t, addr, client).server == after
			})
		})
	}
}

// TestServerKeepsLastGoodCertificate breaks the files in the ways a rotation
// goes wrong, and expects the old certificate to be served, an error logged
// without key material, and the next good files to be picked up.
func TestServerKeepsLastGoodCertificate(t *testing.T) {
	tests := []struct {
		name    string
		corrupt func(t *testing.T, pki *testenv.PKI, f tlsutil.Files)
	}{
		{"garbage certificate", func(t *testing.T, _ *testenv.PKI, f tlsutil.Files) {
			replaceFile(t, f.CertFile, []byte("not a certificate\n"))
		}},
		{"empty certificate", func(t *testing.T, _ *testenv.PKI, f tlsutil.Files) {
			replaceFile(t, f.CertFile, nil)
		}},
		{"half-written certificate", func(t *testing.T, _ *testenv.PKI, f tlsutil.Files) {
			pem := readFile(t, f.CertFile)
			replaceFile(t, f.CertFile, pem[:len(pem)/2])
		}},
		{"key of another certificate", func(t *testing.T, pki *testenv.PKI, f tlsutil.Files) {
			_, otherKey := pki.Issue(t, "other", testenv.IssueOptions{Server: true})
			replaceFile(t, f.KeyFile, readFile(t, otherKey))
		}},
		{"key removed", func(t *testing.T, _ *testenv.PKI, f tlsutil.Files) {
			if err := os.Remove(f.KeyFile); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pki := testenv.NewPKI(t)
			cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
			files := tlsutil.Files{CertFile: cert, KeyFile: key}
			logs := &logBuffer{}
			addr := startServer(t, files, logs.logger())
			client := clientConfig(t, tlsutil.Files{CAFile: pki.CAFile()})
			good := serialOf(t, cert)
			keyPEM := readFile(t, key)

			tt.corrupt(t, pki, files)
			eventually(t, "a failed reload is logged", func() bool {
				return strings.Contains(logs.String(), "reload failed")
			})
			if got := mustDial(t, addr, client).server; got != good {
				t.Errorf("after a bad reload the server presents serial %s, want the last good %s", got, good)
			}
			assertNoKeyMaterial(t, logs.String(), keyPEM, readFileIfExists(t, key))

			pki.Issue(t, "server", testenv.IssueOptions{Server: true})
			fixed := serialOf(t, cert)
			if fixed == good {
				t.Fatalf("repair left serial %s on disk", good)
			}
			eventually(t, "server presents the repaired certificate", func() bool {
				return mustDial(t, addr, client).server == fixed
			})
		})
	}
}

func TestMutualTLS(t *testing.T) {
	pki := testenv.NewPKI(t)
	other := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	addr := startServer(t, tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: pki.CAFile()}, nil)

	tests := []struct {
		name   string
		client func(t *testing.T) (tlsutil.Files, string) // files and the serial the server must see
		wantOK bool
	}{
		{"certificate from the client CA", func(t *testing.T) (tlsutil.Files, string) {
			c, k := pki.Issue(t, "client", testenv.IssueOptions{Client: true})
			return tlsutil.Files{CertFile: c, KeyFile: k}, serialOf(t, c)
		}, true},
		{"no certificate", func(t *testing.T) (tlsutil.Files, string) {
			return tlsutil.Files{}, ""
		}, false},
		{"certificate from another CA", func(t *testing.T) (tlsutil.Files, string) {
			c, k := other.Issue(t, "stranger", testenv.IssueOptions{Client: true})
			return tlsutil.Files{CertFile: c, KeyFile: k}, ""
		}, false},
		{"certificate without client usage", func(t *testing.T) (tlsutil.Files, string) {
			c, k := pki.Issue(t, "server-only", testenv.IssueOptions{Server: true})
			return tlsutil.Files{CertFile: c, KeyFile: k}, ""
		}, false},
		{"expired certificate", func(t *testing.T) (tlsutil.Files, string) {
			c, k := pki.Issue(t, "expired", testenv.IssueOptions{Client: true, NotAfter: time.Now().Add(-time.Second)})
			return tlsutil.Files{CertFile: c, KeyFile: k}, ""
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files, wantSeen := tt.client(t)
			files.CAFile = pki.CAFile()
			got, err := dial(addr, clientConfig(t, files))
			switch {
			case tt.wantOK && err != nil:
				t.Fatalf("handshake failed: %v", err)
			case !tt.wantOK && err == nil:
				t.Fatalf("handshake succeeded and the server saw client %q, want it refused", got.seen)
			case tt.wantOK && got.seen != wantSeen:
				t.Errorf("server verified client serial %q, want %q", got.seen, wantSeen)
			}
		})
	}
}

func TestServerReloadsClientCA(t *testing.T) {
	oldCA, newCA := testenv.NewPKI(t), testenv.NewPKI(t)
	cert, key := oldCA.Issue(t, "server", testenv.IssueOptions{Server: true})
	caFile := filepath.Join(t.TempDir(), "client-ca.pem")
	replaceFile(t, caFile, readFile(t, oldCA.CAFile()))
	addr := startServer(t, tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: caFile}, nil)

	clientOf := func(pki *testenv.PKI) *tls.Config {
		c, k := pki.Issue(t, "client", testenv.IssueOptions{Client: true})
		return clientConfig(t, tlsutil.Files{CertFile: c, KeyFile: k, CAFile: oldCA.CAFile()})
	}
	oldClient, newClient := clientOf(oldCA), clientOf(newCA)
	if _, err := dial(addr, newClient); err == nil {
		t.Fatal("client of the new CA accepted before the CA rotation")
	}

	replaceFile(t, caFile, readFile(t, newCA.CAFile()))
	eventually(t, "client of the new CA is accepted", func() bool {
		_, err := dial(addr, newClient)
		return err == nil
	})
	if _, err := dial(addr, oldClient); err == nil {
		t.Error("client of the removed CA still accepted")
	}
}

func TestClientConfigPresentsRotatedCertificate(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	addr := startServer(t, tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: pki.CAFile()}, nil)
	clientCert, clientKey := pki.Issue(t, "client", testenv.IssueOptions{Client: true})
	client := clientConfig(t, tlsutil.Files{CertFile: clientCert, KeyFile: clientKey, CAFile: pki.CAFile()})

	before := serialOf(t, clientCert)
	if got := mustDial(t, addr, client).seen; got != before {
		t.Fatalf("server saw client serial %s, want %s", got, before)
	}
	pki.Issue(t, "client", testenv.IssueOptions{Client: true})
	want := serialOf(t, clientCert)
	if want == before {
		t.Fatalf("rotation left serial %s on disk", before)
	}
	eventually(t, "client presents the rotated certificate", func() bool {
		return mustDial(t, addr, client).seen == want
	})
}

func TestConfigErrors(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{})
	_, otherKey := pki.Issue(t, "other", testenv.IssueOptions{})
	garbage := filepath.Join(t.TempDir(), "garbage.pem")
	replaceFile(t, garbage, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n"))
	missing := filepath.Join(t.TempDir(), "missing.pem")

	tests := []struct {
		name  string
		build func() (*tlsutil.Reloader, *tls.Config, error)
	}{
		{"server without key", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewServerConfig(tlsutil.Files{CertFile: cert}, nil)
		}},
		{"server with missing certificate", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewServerConfig(tlsutil.Files{CertFile: missing, KeyFile: key}, nil)
		}},
		{"server with key of another certificate", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewServerConfig(tlsutil.Files{CertFile: cert, KeyFile: otherKey}, nil)
		}},
		{"server with truncated client CA", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewServerConfig(tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: garbage}, nil)
		}},
		{"server with a key as client CA", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewServerConfig(tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: key}, nil)
		}},
		{"client with certificate but no key", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewClientConfig(tlsutil.Files{CertFile: cert}, "localhost", nil)
		}},
		{"client with missing CA", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewClientConfig(tlsutil.Files{CAFile: missing}, "localhost", nil)
		}},
		{"client with key of another certificate", func() (*tlsutil.Reloader, *tls.Config, error) {
			return tlsutil.NewClientConfig(tlsutil.Files{CertFile: cert, KeyFile: otherKey}, "localhost", nil)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, cfg, err := tt.build()
			if err == nil {
				r.Close()
				t.Fatalf("got a config (%v), want an error", cfg != nil)
			}
			assertNoKeyMaterial(t, err.Error(), readFile(t, key), readFile(t, otherKey))
		})
	}
}

// startServer serves TLS on loopback with a configuration from
// NewServerConfig. After each handshake it writes one line: the serial of
// the client certificate it verified, or "-".
func startServer(t *testing.T, f tlsutil.Files, logger *slog.Logger) string {
	t.Helper()
	r, cfg, err := tlsutil.NewServerConfig(f, logger)
	if err != nil {
		t.Fatalf("NewServerConfig: %v", err)
	}
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { reportClient(conn.(*tls.Conn)) })
		}
	})
	t.Cleanup(func() {
		lis.Close()
		wg.Wait()
		if err := r.Close(); err != nil {
			t.Errorf("Reloader.Close: %v", err)
		}
	})
	return lis.Addr().String()
}

func reportClient(conn *tls.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := conn.Handshake(); err != nil {
		return
	}
	seen := "-"
	if chains := conn.ConnectionState().VerifiedChains; len(chains) > 0 {
		seen = chains[0][0].SerialNumber.Text(16)
	}
	fmt.Fprintln(conn, seen)
}

type handshake struct {
	server  string // serial of the certificate the server presented
	seen    string // serial of the client certificate the server verified, or "-"
	version uint16
}

// dial completes a handshake and reads the server's line. In TLS 1.3 the
// server rejects a client certificate after the client's handshake is done,
// so only the read tells whether the server accepted it.
func dial(addr string, cfg *tls.Config) (handshake, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return handshake{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return handshake{}, fmt.Errorf("read after handshake: %w", err)
	}
	state := conn.(*tls.Conn).ConnectionState()
	return handshake{
		server:  state.PeerCertificates[0].SerialNumber.Text(16),
		seen:    strings.TrimSpace(line),
		version: state.Version,
	}, nil
}

func mustDial(t *testing.T, addr string, cfg *tls.Config) handshake {
	t.Helper()
	h, err := dial(addr, cfg)
	if err != nil {
		t.Fatalf("handshake with %s: %v", addr, err)
	}
	return h
}

func clientConfig(t *testing.T, f tlsutil.Files) *tls.Config {
	t.Helper()
	r, cfg, err := tlsutil.NewClientConfig(f, "localhost", nil)
	if err != nil {
		t.Fatalf("NewClientConfig: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return cfg
}

// eventually polls cond until it holds or reloadDeadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(reloadDeadline)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s", reloadDeadline, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func serialOf(t *testing.T, certFile string) string {
	t.Helper()
	block, _ := pem.Decode(readFile(t, certFile))
	if block == nil {
		t.Fatalf("%s holds no PEM", certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert.SerialNumber.Text(16)
}

// copyPair issues a pair named name and writes it over f in place
// (truncate, then write), certificate first, as cp does.
func copyPair(t *testing.T, pki *testenv.PKI, name string, f tlsutil.Files) {
	t.Helper()
	cert, key := pki.Issue(t, name, testenv.IssueOptions{Server: true})
	if err := os.WriteFile(f.CertFile, readFile(t, cert), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.KeyFile, readFile(t, key), 0o600); err != nil {
		t.Fatal(err)
	}
}

// secretVolume lays files out as the kubelet does for a secret volume:
// tls.crt -> ..data/tls.crt, ..data -> ..<version>/, and an update swaps the
// ..data symlink in one rename. The files themselves never get an event.
type secretVolume struct{ dir string }

func newSecretVolume(t *testing.T) *secretVolume {
	t.Helper()
	v := &secretVolume{dir: t.TempDir()}
	for _, name := range []string{"tls.crt", "tls.key"} {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(v.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return v
}

func (v *secretVolume) files() tlsutil.Files {
	return tlsutil.Files{CertFile: filepath.Join(v.dir, "tls.crt"), KeyFile: filepath.Join(v.dir, "tls.key")}
}

func (v *secretVolume) publish(t *testing.T, pki *testenv.PKI, version string) {
	t.Helper()
	versionDir := "..data_" + version
	if err := os.Mkdir(filepath.Join(v.dir, versionDir), 0o755); err != nil {
		t.Fatal(err)
	}
	copyPair(t, pki, version, tlsutil.Files{
		CertFile: filepath.Join(v.dir, versionDir, "tls.crt"),
		KeyFile:  filepath.Join(v.dir, versionDir, "tls.key"),
	})
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(versionDir, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

// replaceFile writes data to a temporary file and renames it over path.
func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readFileIfExists(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return b
}

// assertNoKeyMaterial fails if text holds a PEM block or any line of the
// base64 body of the given keys.
func assertNoKeyMaterial(t *testing.T, text string, keys ...[]byte) {
	t.Helper()
	if strings.Contains(text, "-----BEGIN") {
		t.Errorf("text holds a PEM block:\n%s", text)
	}
	for _, key := range keys {
		for line := range bytes.Lines(key) {
			line = bytes.TrimSpace(line)
			if len(line) >= 16 && !bytes.HasPrefix(line, []byte("-----")) && strings.Contains(text, string(line)) {
				t.Errorf("text holds key material %q:\n%s", line, text)
			}
		}
	}
}

// logBuffer collects log output; the reloader writes from its goroutine
// while the test reads.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
