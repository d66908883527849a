package authn_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"net/url"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"

	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/tlsutil"
)

const spiffeID = "spiffe://example.org/ns/billing/sa/api"

func TestFromCertificate(t *testing.T) {
	cnOn := authn.CertOptions{AllowCN: true}
	tests := []struct {
		name   string
		cert   *x509.Certificate
		opts   authn.CertOptions
		want   authn.Principal
		wantOK bool
	}{
		{"URI SAN wins over DNS SAN and CN", &x509.Certificate{
			URIs:     []*url.URL{mustURL(t, spiffeID)},
			DNSNames: []string{"api.billing.svc"},
			Subject:  pkix.Name{CommonName: "api"},
		}, cnOn, authn.Principal{Name: spiffeID, Via: authn.ViaURISAN}, true},
		{"two URI SANs are ambiguous", &x509.Certificate{
			URIs:     []*url.URL{mustURL(t, spiffeID), mustURL(t, "spiffe://example.org/other")},
			DNSNames: []string{"api.billing.svc"},
		}, cnOn, authn.Principal{}, false},
		{"a URI SAN without authority could pose as another kind", &x509.Certificate{
			URIs:     []*url.URL{mustURL(t, "key:billing-batch")},
			DNSNames: []string{"api.billing.svc"},
		}, cnOn, authn.Principal{}, false},
		{"DNS SAN, prefixed and in lower case", &x509.Certificate{
			DNSNames: []string{"API.billing.svc", "api"},
			Subject:  pkix.Name{CommonName: "cn-api"},
		}, cnOn, authn.Principal{Name: "dns:api.billing.svc", Via: authn.ViaDNSSAN}, true},
		{"DNS SAN named like an API key", &x509.Certificate{DNSNames: []string{"billing-batch"}},
			authn.CertOptions{}, authn.Principal{Name: "dns:billing-batch", Via: authn.ViaDNSSAN}, true},
		{"DNS SANs switched off", &x509.Certificate{DNSNames: []string{"api"}}, authn.CertOptions{DisableDNS: true}, authn.Principal{}, false},
		{"CN only: nobody unless enabled", &x509.Certificate{Subject: pkix.Name{CommonName: spiffeID}}, authn.CertOptions{}, authn.Principal{}, false},
		{"CN only, enabled: prefixed, never the URI it spells", &x509.Certificate{Subject: pkix.Name{CommonName: spiffeID}},
			cnOn, authn.Principal{Name: "cn:" + spiffeID, Via: authn.ViaCN}, true},
		{"empty SANs are skipped", &x509.Certificate{
			URIs:     []*url.URL{nil, {}},
			DNSNames: []string{""},
			Subject:  pkix.Name{CommonName: "cn-api"},
		}, cnOn, authn.Principal{Name: "cn:cn-api", Via: authn.ViaCN}, true},
		{"no name at all", &x509.Certificate{Subject: pkix.Name{Organization: []string{"fleetbroker"}}}, cnOn, authn.Principal{}, false},
		{"nil certificate", nil, cnOn, authn.Principal{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := authn.FromCertificate(tt.cert, tt.opts)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("FromCertificate = %+v, %v; want %+v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func TestIsURIName(t *testing.T) {
	for name, want := range map[string]bool{
		spiffeID: true, "https://example.org": true, "spiffe://td": true,
		"key:x": false, "dns:x": false, "cn:spiffe://x": false, "spiffe:///path": false, "://x": false, "1x://y": false, "": false,
	} {
		if got := authn.IsURIName(name); got != want {
			t.Errorf("IsURIName(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestContext(t *testing.T) {
	if p, ok := authn.FromContext(context.Background()); ok {
		t.Errorf("FromContext(empty) = %+v, true; want false", p)
	}
	want := authn.Principal{Name: spiffeID, Via: authn.ViaURISAN}
	if got, ok := authn.FromContext(authn.NewContext(context.Background(), want)); !ok || got != want {
		t.Errorf("FromContext(NewContext(p)) = %+v, %v; want %+v, true", got, ok, want)
	}
}

// TestFromPeer covers what the handshake can leave in a call's peer; only a
// verified chain names the caller.
func TestFromPeer(t *testing.T) {
	named := &x509.Certificate{URIs: []*url.URL{mustURL(t, spiffeID)}}
	unnamed := &x509.Certificate{}
	tests := []struct {
		name   string
		ctx    context.Context
		want   authn.Principal
		wantOK bool
	}{
		{"no peer", context.Background(), authn.Principal{}, false},
		{"not TLS", peer.NewContext(context.Background(), &peer.Peer{AuthInfo: otherAuth{}}), authn.Principal{}, false},
		{"TLS without client certificate", tlsPeer(tls.ConnectionState{}), authn.Principal{}, false},
		{"unverified client certificate", tlsPeer(tls.ConnectionState{
			PeerCertificates: []*x509.Certificate{named},
		}), authn.Principal{}, false},
		{"verified client certificate", tlsPeer(tls.ConnectionState{
			PeerCertificates: []*x509.Certificate{named},
			VerifiedChains:   [][]*x509.Certificate{{named}},
		}), authn.Principal{Name: spiffeID, Via: authn.ViaURISAN}, true},
		{"verified leaf differs from the presented one", tlsPeer(tls.ConnectionState{
			PeerCertificates: []*x509.Certificate{named},
			VerifiedChains:   [][]*x509.Certificate{{unnamed}},
		}), authn.Principal{}, false},
		{"empty verified chain", tlsPeer(tls.ConnectionState{
			VerifiedChains: [][]*x509.Certificate{{}},
		}), authn.Principal{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := authn.FromPeer(tt.ctx, authn.CertOptions{})
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("FromPeer = %+v, %v; want %+v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

// TestFromPeerOverGRPC runs real handshakes on loopback: a handler sees the
// URI SAN of a verified client certificate, and nothing for a certificate
// the server did not verify.
func TestFromPeerOverGRPC(t *testing.T) {
	pki := testenv.NewPKI(t)
	serverCert, serverKey := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	serverFiles := tlsutil.Files{CertFile: serverCert, KeyFile: serverKey, CAFile: pki.CAFile()}

	tests := []struct {
		name string
		// serverConfig adapts the mTLS configuration from tlsutil.
		serverConfig func(*tls.Config) *tls.Config
		client       testenv.IssueOptions
		want         authn.Principal
		wantOK       bool
	}{
		{"URI SAN", nil, testenv.IssueOptions{Client: true, URIs: []string{spiffeID}},
			authn.Principal{Name: spiffeID, Via: authn.ViaURISAN}, true},
		{"DNS SAN", nil, testenv.IssueOptions{Client: true, DNSNames: []string{"api.billing.svc"}},
			authn.Principal{Name: "dns:api.billing.svc", Via: authn.ViaDNSSAN}, true},
		{"certificate requested but not verified", requestOnly, testenv.IssueOptions{Client: true, URIs: []string{spiffeID}},
			authn.Principal{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, cfg, err := tlsutil.NewServerConfig(serverFiles, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			if tt.serverConfig != nil {
				cfg = tt.serverConfig(cfg)
			}
			addr, seen := startGRPC(t, cfg)

			cert, key := pki.Issue(t, "client", tt.client)
			callHealth(t, addr, tlsutil.Files{CertFile: cert, KeyFile: key, CAFile: pki.CAFile()})
			got := <-seen
			if got.p != tt.want || got.ok != tt.wantOK {
				t.Errorf("handler saw %+v, %v; want %+v, %v", got.p, got.ok, tt.want, tt.wantOK)
			}
		})
	}
}

// requestOnly turns the server into one that asks for a client certificate
// but accepts any, unverified: the misconfiguration FromPeer must survive.
func requestOnly(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	c.ClientAuth = tls.RequireAnyClientCert
	c.GetConfigForClient = nil
	return c
}

type seenPeer struct {
	p  authn.Principal
	ok bool
}

// startGRPC serves the health service over TLS on loopback and reports what
// FromPeer returns in each call.
func startGRPC(t *testing.T, cfg *tls.Config) (string, <-chan seenPeer) {
	t.Helper()
	seen := make(chan seenPeer, 1)
	capture := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		p, ok := authn.FromPeer(ctx, authn.CertOptions{})
		seen <- seenPeer{p, ok}
		return handler(ctx, req)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)), grpc.UnaryInterceptor(capture))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String(), seen
}

func callHealth(t *testing.T, addr string, f tlsutil.Files) {
	t.Helper()
	r, cfg, err := tlsutil.NewClientConfig(f, "localhost", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health check over mTLS: %v", err)
	}
}

func tlsPeer(state tls.ConnectionState) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: state}})
}

type otherAuth struct{}

func (otherAuth) AuthType() string { return "other" }

func mustURL(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
