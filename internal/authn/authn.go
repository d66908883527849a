// Package authn names the caller of an RPC. A Principal is who the caller
// is and how that was established; deciding what the caller may do is the
// policy's job, not this package's.
//
// The strongest source is a client certificate verified by mutual TLS,
// named by its SPIFFE-style URI SAN (spiffe://example.org/ns/billing/sa/api).
// Only certificates that verified against the server's client CA count: a
// certificate a client merely presented is never an identity.
package authn

import (
	"context"
	"crypto/x509"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// How a Principal was established; the values of Principal.Via.
const (
	ViaMTLS   = "mtls"    // a verified client certificate
	ViaAPIKey = "api-key" // a configured bearer key
	ViaHeader = "header"  // a header set by a trusted proxy
	ViaNone   = "none"    // no authentication (dev mode)
)

// Principal is an authenticated caller.
type Principal struct {
	// Name identifies the caller, e.g. a SPIFFE ID.
	Name string
	// Via says how Name was established: ViaMTLS, ViaAPIKey, ViaHeader or
	// ViaNone.
	Via string
}

type contextKey struct{}

// NewContext returns ctx carrying p, for handlers and policy downstream.
func NewContext(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, contextKey{}, p)
}

// FromContext returns the Principal stored by NewContext.
func FromContext(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(contextKey{}).(Principal)
	return p, ok
}

// FromCertificate names the holder of cert: its first URI SAN (a SPIFFE
// ID), else its first DNS SAN, else its subject common name. It reports
// false when cert carries none of them. It does not verify cert.
func FromCertificate(cert *x509.Certificate) (string, bool) {
	if cert == nil {
		return "", false
	}
	for _, u := range cert.URIs {
		if u == nil {
			continue
		}
		if s := u.String(); s != "" {
			return s, true
		}
	}
	for _, name := range cert.DNSNames {
		if name != "" {
			return name, true
		}
	}
	if cn := cert.Subject.CommonName; cn != "" {
		return cn, true
	}
	return "", false
}

// FromPeer names the caller of a gRPC call by the client certificate that
// the TLS handshake verified. It reports false for calls without TLS,
// without a client certificate, or with one that was not verified (a server
// that requests but does not verify certificates), so a self-signed
// certificate can never claim a name.
func FromPeer(ctx context.Context) (Principal, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Principal{}, false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return Principal{}, false
	}
	// VerifiedChains[0][0] is the leaf of a chain that verified; the
	// unverified PeerCertificates must not be used.
	chains := info.State.VerifiedChains
	if len(chains) == 0 || len(chains[0]) == 0 {
		return Principal{}, false
	}
	name, ok := FromCertificate(chains[0][0])
	if !ok {
		return Principal{}, false
	}
	return Principal{Name: name, Via: ViaMTLS}, true
}
