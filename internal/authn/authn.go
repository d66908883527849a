// Package authn names the caller of an RPC. A Principal is who the caller
// is and how that was established; deciding what the caller may do is the
// policy's job, not this package's.
//
// Every principal name says where it came from, so two kinds of identity can
// never be confused for one another:
//
//	spiffe://example.org/ns/billing/sa/api   a certificate's URI SAN (any scheme://, only from a URI SAN)
//	dns:billing-batch.example.org            a certificate's DNS SAN (when it has no URI SAN)
//	cn:billing-batch                         a certificate's subject CN (only with CN principals enabled)
//	key:billing-batch                        a configured API key
//
// A certificate whose CN reads "spiffe://…/gateway" is therefore
// "cn:spiffe://…/gateway", never the gateway, and a DNS SAN "billing-batch"
// is "dns:billing-batch", never the API key named billing-batch.
//
// Only certificates that verified against the server's client CA count: a
// certificate a client merely presented is never an identity. This package
// never sees or stores a secret.
package authn

import (
	"context"
	"crypto/x509"
	"net/url"
	"strings"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// How a Principal was established; the values of Principal.Via.
const (
	ViaURISAN = "uri-san" // a verified client certificate's URI SAN
	ViaDNSSAN = "dns-san" // a verified client certificate's DNS SAN
	ViaCN     = "cn"      // a verified client certificate's subject CN
	ViaAPIKey = "api-key" // a configured bearer key
	ViaHeader = "header"  // a header set by a trusted proxy
	ViaNone   = "none"    // no authentication (dev mode)
)

// The prefixes of principal names that are not URIs.
const (
	PrefixDNS = "dns:"
	PrefixCN  = "cn:"
	PrefixKey = "key:"
)

// Principal is an authenticated caller.
type Principal struct {
	// Name identifies the caller with its source prefix, e.g. a SPIFFE ID
	// or "key:billing-batch".
	Name string
	// Via says how Name was established: ViaURISAN, ViaDNSSAN, ViaCN,
	// ViaAPIKey, ViaHeader or ViaNone.
	Via string
}

// Authenticated reports whether p names a caller that proved who it is
// (anything but ViaNone).
func (p Principal) Authenticated() bool { return p.Name != "" && p.Via != ViaNone && p.Via != "" }

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

// CertOptions says which certificate fields may name a caller. URI SANs
// always may; DNS SANs may unless DisableDNS; the subject CN only with
// AllowCN, since any CA that signs a server certificate for a name can put
// anything in a CN.
type CertOptions struct {
	AllowCN    bool
	DisableDNS bool
}

// FromCertificate names the holder of cert: its URI SAN (which must be a
// hierarchical URI such as spiffe://trust.domain/path, and the only one), else
// "dns:" + its first DNS SAN, else, with opts.AllowCN, "cn:" + its subject
// CN. It reports false when no allowed field names the holder, and for a
// certificate with several URI SANs (ambiguous: a SPIFFE SVID has exactly
// one) or with a URI SAN that is not scheme://authority…, which could pose as
// another kind of principal ("key:x" is a valid URI). It does not verify cert.
func FromCertificate(cert *x509.Certificate, opts CertOptions) (Principal, bool) {
	if cert == nil {
		return Principal{}, false
	}
	var uris []*url.URL
	for _, u := range cert.URIs {
		if u != nil && u.String() != "" {
			uris = append(uris, u)
		}
	}
	if len(uris) > 0 {
		if len(uris) != 1 {
			return Principal{}, false
		}
		name := uris[0].String()
		if !IsURIName(name) {
			return Principal{}, false
		}
		return Principal{Name: name, Via: ViaURISAN}, true
	}
	if !opts.DisableDNS {
		for _, name := range cert.DNSNames {
			if name != "" {
				return Principal{Name: PrefixDNS + strings.ToLower(name), Via: ViaDNSSAN}, true
			}
		}
	}
	if cn := cert.Subject.CommonName; cn != "" && opts.AllowCN {
		return Principal{Name: PrefixCN + cn, Via: ViaCN}, true
	}
	return Principal{}, false
}

// IsURIName reports whether name is a principal of the URI form:
// scheme://authority[/path], as SPIFFE IDs are. Names of this form come
// only from URI SANs (or a trusted proxy that verified one).
func IsURIName(name string) bool {
	scheme, rest, ok := strings.Cut(name, "://")
	if !ok || scheme == "" || rest == "" || strings.HasPrefix(rest, "/") {
		return false
	}
	for i, c := range scheme {
		alpha := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !alpha && (i == 0 || !(c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.')) {
			return false
		}
	}
	u, err := url.Parse(name)
	return err == nil && u.Host != "" && u.Opaque == ""
}

// FromPeer names the caller of a gRPC call by the client certificate that
// the TLS handshake verified. It reports false for calls without TLS,
// without a client certificate, or with one that was not verified (a server
// that requests but does not verify certificates), so a self-signed
// certificate can never claim a name.
func FromPeer(ctx context.Context, opts CertOptions) (Principal, bool) {
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
	return FromCertificate(chains[0][0], opts)
}

// PresentedCertificate reports whether the caller completed a TLS handshake
// with a verified client certificate, named or not: a certificate that names
// nobody must not fall through to weaker identities such as an API key.
func PresentedCertificate(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	return ok && len(info.State.VerifiedChains) > 0
}

// PeerAddr is the caller's network address as the server saw it (for the
// audit trail), or "".
func PeerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
