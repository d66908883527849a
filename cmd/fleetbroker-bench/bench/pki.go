package bench

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// pkiFailure is what pkiTB.Fatalf panics with; newPKI turns it into an error.
type pkiFailure struct{ msg string }

// pkiTB lets the bench use the tests' certificate authority
// (testenv.PKI) outside a test. PKI calls only Helper, Fatalf and TempDir;
// any other testing.TB method would panic on the nil embedded TB.
type pkiTB struct {
	testing.TB
	dir string
}

func (*pkiTB) Helper() {}

func (*pkiTB) Fatalf(format string, args ...any) { panic(pkiFailure{fmt.Sprintf(format, args...)}) }

func (t *pkiTB) TempDir() string {
	d, err := os.MkdirTemp(t.dir, "pki-")
	if err != nil {
		t.Fatalf("pki directory: %v", err)
	}
	return d
}

// benchPKI holds the certificates of the production variants: the
// credentials service's, the gateway's (server, and client towards the
// credentials service, with the gateway's principal) and the bench
// caller's.
type benchPKI struct {
	caFile              string
	credsCert, credsKey string
	gwCert, gwKey       string
	callerTLS           *tls.Config // the caller's client configuration
	gatewayTLS          *tls.Config // the gateway identity's, for ResolveSession
}

// newPKI makes a CA and the certificates in dir.
func newPKI(dir string) (p *benchPKI, err error) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(pkiFailure)
			if !ok {
				panic(r)
			}
			err = fmt.Errorf("bench PKI: %s", f.msg)
		}
	}()
	t := &pkiTB{dir: dir}
	ca := testenv.NewPKI(t)
	loopback := testenv.IssueOptions{DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}
	p = &benchPKI{caFile: ca.CAFile()}
	p.credsCert, p.credsKey = ca.Issue(t, "credentials", testenv.IssueOptions{Server: true, DNSNames: loopback.DNSNames, IPs: loopback.IPs})
	gw := loopback
	gw.URIs = []string{gatewayPrincipal}
	p.gwCert, p.gwKey = ca.Issue(t, "gateway", gw)
	callerCert, callerKey := ca.Issue(t, "caller", testenv.IssueOptions{Client: true, URIs: []string{callerPrincipal}})
	if p.callerTLS, err = clientTLS(p.caFile, callerCert, callerKey); err != nil {
		return nil, err
	}
	if p.gatewayTLS, err = clientTLS(p.caFile, p.gwCert, p.gwKey); err != nil {
		return nil, err
	}
	return p, nil
}

// clientTLS is a TLS 1.3 client configuration presenting cert, trusting ca.
func clientTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("bench PKI: no certificate in %s", caFile)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: "localhost", MinVersion: tls.VersionTLS13}, nil
}
