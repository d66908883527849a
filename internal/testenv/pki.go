package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// PKI is a throwaway certificate authority for TLS tests: an ECDSA P-256 CA
// whose certificate, and every certificate it issues, live as PEM files in a
// directory removed when the test ends.
type PKI struct {
	dir    string
	caFile string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
}

// IssueOptions shapes a certificate from PKI.Issue.
type IssueOptions struct {
	URIs     []string // URI SANs, e.g. "spiffe://example.org/ns/billing/sa/api"
	DNSNames []string
	IPs      []net.IP
	// Server and Client select the extended key usages; neither means both.
	Server, Client bool
	// NotAfter defaults to an hour from now.
	NotAfter time.Time
	// CommonName is the subject CN; default the name given to Issue. Set it
	// for CNs that are not file names, e.g. "spiffe://…/gateway".
	CommonName string
}

// NewPKI makes a new CA in a fresh t.TempDir(). Two PKIs never trust each
// other's certificates.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	key := pkiNewKey(t)
	serial := pkiNewSerial(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "fleetbroker test CA " + serial.Text(16)},
		NotBefore:             time.Now().Add(-time.Minute), // tolerate clock skew
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("create CA certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse CA certificate: %v", err)
	}
	p := &PKI{dir: t.TempDir(), cert: cert, key: key}
	p.caFile = filepath.Join(p.dir, "ca.pem")
	pkiWriteFile(t, p.caFile, pkiPEM("CERTIFICATE", der), 0o644)
	return p
}

// CAFile is the path of the CA certificate (PEM).
func (p *PKI) CAFile() string { return p.caFile }

// Issue signs a new certificate with a new key for name (also its subject
// CN) and writes them to <dir>/<name>.pem and <dir>/<name>-key.pem. A server
// certificate with no SANs given gets DNS "localhost" and IP 127.0.0.1.
// Calling Issue again with the same name replaces both files by rename, the
// way editors and Kubernetes secret mounts do, which is what rotation tests
// need.
func (p *PKI) Issue(t testing.TB, name string, opts IssueOptions) (certFile, keyFile string) {
	t.Helper()
	if name == "" || strings.ContainsAny(name, `/\`) {
		t.Fatalf("certificate name %q must be a plain file name", name)
	}
	tmpl := pkiLeafTemplate(t, name, opts)
	key := pkiNewKey(t)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatalf("issue certificate %q: %v", name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatalf("marshal key of %q: %v", name, err)
	}
	certFile = filepath.Join(p.dir, name+".pem")
	keyFile = filepath.Join(p.dir, name+"-key.pem")
	pkiWriteFile(t, keyFile, pkiPEM("PRIVATE KEY", keyDER), 0o600)
	pkiWriteFile(t, certFile, pkiPEM("CERTIFICATE", der), 0o644)
	return certFile, keyFile
}

func pkiLeafTemplate(t testing.TB, name string, opts IssueOptions) *x509.Certificate {
	t.Helper()
	if !opts.Server && !opts.Client {
		opts.Server, opts.Client = true, true
	}
	if opts.NotAfter.IsZero() {
		opts.NotAfter = time.Now().Add(time.Hour)
	}
	cn := name
	if opts.CommonName != "" {
		cn = opts.CommonName
	}
	tmpl := &x509.Certificate{
		SerialNumber: pkiNewSerial(t),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     opts.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     opts.DNSNames,
		IPAddresses:  opts.IPs,
	}
	if opts.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		if len(opts.DNSNames) == 0 && len(opts.IPs) == 0 {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		}
	}
	if opts.Client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	for _, raw := range opts.URIs {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatalf("URI SAN %q: %v", raw, err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	return tmpl
}

func pkiNewKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generate key: %v", err)
	}
	return key
}

// pkiNewSerial is a random 128-bit serial, so every certificate (and a
// rotated one in particular) is told apart by its serial.
func pkiNewSerial(t testing.TB) *big.Int {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatalf("generate serial: %v", err)
	}
	return serial
}

func pkiPEM(blockType string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der})
}

// pkiWriteFile replaces path in one rename, so a watcher never sees a
// half-written file.
func pkiWriteFile(t testing.TB, path string, data []byte, perm os.FileMode) {
	t.Helper()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}
