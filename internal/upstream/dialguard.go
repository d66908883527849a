package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"syscall"
	"time"
)

// Check approves a base URL by its host name only. A name on the list — a
// provider default, or a self-hosted Wialon whose DNS a tenant controls —
// can still resolve, now or after a DNS rebinding, to loopback, a private
// network or the cloud metadata service. The guarded dialer in this file
// closes that gap by checking the addresses a connection actually goes to.

// ErrForbiddenAddress is wrapped by every error the guarded dialer returns
// when an allowed host resolves to an internal address. It wraps
// ErrNotAllowed, so one errors.Is(err, ErrNotAllowed) check covers both a
// refused base URL and a refused address.
var ErrForbiddenAddress = fmt.Errorf("%w: forbidden address", ErrNotAllowed)

// forbiddenRanges are the address ranges a connection may reach only when
// an operator listed the host explicitly. They cover everything that is
// not the public internet and could reach the broker's own host, its
// network or its cloud provider's services.
var forbiddenRanges = []struct {
	prefix netip.Prefix
	class  string
}{
	// 0.0.0.0/8 is "this network"; on Linux, connecting to 0.0.0.0 reaches
	// the local host.
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared (CGNAT)"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	// Includes the cloud metadata service, 169.254.169.254.
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	// Reserved for future use, and the limited broadcast address.
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},
	{netip.MustParsePrefix("::/128"), "unspecified"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("fc00::/7"), "private (ULA)"},
	// Deprecated site-local addresses, which some stacks still route locally.
	{netip.MustParsePrefix("fec0::/10"), "site-local"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// nat64 is the well-known NAT64 prefix (RFC 6052). On an IPv6-only network
// with NAT64, 64:ff9b::a00:1 reaches 10.0.0.1, so the embedded IPv4
// address is what counts.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// addressClass returns the class of a forbidden address ("loopback",
// "private", ...) or "" for an address on the public internet.
func addressClass(ip netip.Addr) string {
	// An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is dialled as the IPv4
	// address it maps. A zone (fe80::1%eth0) must go: Prefix.Contains is
	// false for any address with one.
	ip = ip.Unmap().WithZone("")
	if nat64.Contains(ip) {
		b := ip.As16()
		ip = netip.AddrFrom4([4]byte(b[12:]))
	}
	if !ip.IsValid() {
		return "invalid"
	}
	for _, r := range forbiddenRanges {
		if r.prefix.Contains(ip) {
			return r.class
		}
	}
	return ""
}

// lookupFunc resolves a host name; it has the signature of
// (*net.Resolver).LookupNetIP, and tests replace it.
type lookupFunc func(ctx context.Context, network, host string) ([]netip.Addr, error)

// NewTransport returns an http.Transport for the provider clients that
// dials through a.DialContext, so its connections go only to hosts a allows
// and never to internal addresses a does not name. Its other settings
// are those of http.DefaultTransport, except that it never uses a proxy —
// through a proxy the dialer would vet the proxy's address instead of the
// upstream's, and the proxy would reach internal addresses unchecked.
//
// Use it as the Transport of the http.Client given to wialon.New and
// fleetup.New; the clients never follow redirects, so every request goes
// to the host its base URL names.
func NewTransport(a *AllowList) *http.Transport {
	return &http.Transport{
		Proxy:             nil,
		DialContext:       a.DialContext(&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}),
		ForceAttemptHTTP2: true, // a custom DialContext disables HTTP/2 otherwise
		// Every Wialon account of a hosted deployment talks to one host, and
		// every FleetUp account to another: with Go's default of 2 idle
		// connections per host, concurrent calls reconnect (TCP + TLS) on
		// almost every request. The benchmark measured 0.6–0.9 new
		// connections per call at 16–256 callers before this.
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: 1 * time.Second,
	}
}

// DialContext returns a dial function for http.Transport.DialContext that
// connects only to hosts a allows, and only to addresses that are safe for
// them:
//
//   - A host that matches no entry (explicit or default) is refused with
//     ErrNotAllowed. Check should have refused its base URL already; this
//     is the second line, for a call path that forgot to.
//   - The host is resolved once (base.Resolver, or the default resolver),
//     and the connection goes to those addresses, so no second DNS answer
//     is ever used.
//   - If any resolved address is loopback, private (RFC 1918, ULA,
//     site-local), link-local, CGNAT, unspecified, multicast or reserved
//     (IPv4-mapped and NAT64 forms included), the dial is refused with ErrForbiddenAddress — a mixed
//     answer is a sign of a hostile record, not something to route around.
//   - base's Control hook is extended to check the address of every socket
//     before it connects, so nothing reaches a forbidden address even if
//     the steps above had a gap.
//
// Exempt from the address checks is a host that an entry of a names
// explicitly (with a matching port, if the entry has one): the operator
// who lists "localhost:7480", "127.0.0.1:7480" or "wialon.internal.example"
// accepts where it resolves, as Check's contract already says. The provider
// defaults are never exempt, even when listed explicitly: their DNS is not
// the operator's. Listing a name whose DNS a tenant controls therefore
// trusts that tenant's DNS — list IP addresses, or names in zones the
// operator controls.
//
// The addresses are tried one after another, each with a share of the
// remaining deadline, as net.Dialer does for its fallbacks (without its
// Happy Eyeballs race, which matters little for a few API hosts). Errors
// name the host and the class of address, never the address itself, which
// would tell a tenant about the broker's network.
//
// base may be nil (a net.Dialer with the defaults of
// http.DefaultTransport); it is copied, so later changes to it do not apply.
func (a *AllowList) DialContext(base *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if base == nil {
		base = &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	}
	r := base.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	return a.dialContext(base, r.LookupNetIP)
}

// dialContext is DialContext with the resolver as a parameter, for tests.
func (a *AllowList) dialContext(base *net.Dialer, lookup lookupFunc) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := *base
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var ipNetwork string
		switch network {
		case "tcp":
			ipNetwork = "ip"
		case "tcp4":
			ipNetwork = "ip4"
		case "tcp6":
			ipNetwork = "ip6"
		default:
			return nil, fmt.Errorf("%w: network %q is not tcp", ErrNotAllowed, network)
		}
		rawHost, portStr, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("%w: malformed address", ErrNotAllowed)
		}
		port, err := strconv.ParseUint(portStr, 10, 16)
		if err != nil || port == 0 {
			return nil, fmt.Errorf("%w: invalid port", ErrNotAllowed)
		}
		host := normalizeHost(rawHost)
		allowed, exempt := a.matchDial(host, strconv.FormatUint(port, 10))
		if !allowed {
			return nil, fmt.Errorf("%w: %s is not on the allow-list", ErrNotAllowed, net.JoinHostPort(host, portStr))
		}

		var ips []netip.Addr
		if ip, err := netip.ParseAddr(host); err == nil {
			ips = []netip.Addr{ip}
		} else if ips, err = lookup(ctx, ipNetwork, host); err != nil {
			return nil, err // a *net.DNSError names the host, nothing else
		} else if len(ips) == 0 {
			return nil, &net.DNSError{Err: "no addresses", Name: host, IsNotFound: true}
		}
		if !exempt {
			for _, ip := range ips {
				if class := addressClass(ip); class != "" {
					return nil, forbidden(host, class)
				}
			}
		}

		dd := d
		dd.Control = nil // net ignores Control when ControlContext is set; guardControl calls it
		dd.ControlContext = guardControl(&d, host, exempt)
		return dialSerial(ctx, &dd, network, ips, uint16(port))
	}
}

// guardControl returns a ControlContext hook that refuses a socket whose
// address is forbidden (unless exempt), then runs base's own hook, if any.
// It sees the address the socket will connect to — whatever resolved it.
func guardControl(base *net.Dialer, host string, exempt bool) func(ctx context.Context, network, address string, c syscall.RawConn) error {
	return func(ctx context.Context, network, address string, c syscall.RawConn) error {
		if !exempt {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("%w: unparsable socket address", ErrForbiddenAddress)
			}
			if class := addressClass(ap.Addr()); class != "" {
				return forbidden(host, class)
			}
		}
		switch {
		case base.ControlContext != nil:
			return base.ControlContext(ctx, network, address, c)
		case base.Control != nil:
			return base.Control(network, address, c)
		}
		return nil
	}
}

func forbidden(host, class string) error {
	if _, err := netip.ParseAddr(host); err == nil {
		return fmt.Errorf("%w: %s is a %s address", ErrForbiddenAddress, host, class)
	}
	return fmt.Errorf("%w: %s resolves to a %s address", ErrForbiddenAddress, host, class)
}

// matchDial reports whether any entry allows host:port at dial time, and
// whether an explicit, non-default entry names it (exempting it from the
// address checks). The scheme is not known here; Check enforces https for
// the defaults.
func (a *AllowList) matchDial(host, port string) (allowed, exempt bool) {
	for _, e := range a.all() {
		if e.host != host || (e.port != "" && e.port != port) {
			continue
		}
		allowed = true
		if !e.httpsOnly && !isDefaultHost(host) {
			exempt = true
		}
	}
	return allowed, exempt
}

func isDefaultHost(host string) bool {
	for _, e := range defaultEntries {
		if e.host == host {
			return true
		}
	}
	return false
}

// dialSerial connects to the first of ips that answers. Each attempt gets
// an equal share of the time left (at least 2 s, as net.Dialer gives its
// fallbacks), so one black-holed address cannot use up the whole deadline.
func dialSerial(ctx context.Context, d *net.Dialer, network string, ips []netip.Addr, port uint16) (net.Conn, error) {
	var firstErr error
	for i, ip := range ips {
		if err := ctx.Err(); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			break
		}
		attemptCtx, cancel := ctx, func() {}
		if deadline, ok := ctx.Deadline(); ok {
			attemptCtx, cancel = context.WithDeadline(ctx, partialDeadline(time.Now(), deadline, len(ips)-i))
		}
		conn, err := d.DialContext(attemptCtx, network, netip.AddrPortFrom(ip.Unmap(), port).String())
		cancel()
		if err == nil {
			return conn, nil
		}
		// A refusal by the Control hook comes wrapped in a *net.OpError,
		// whose text names the address; keep the promise not to.
		var oe *net.OpError
		if errors.As(err, &oe) && errors.Is(oe.Err, ErrForbiddenAddress) {
			err = oe.Err
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return nil, firstErr
}

// partialDeadline returns the deadline of one of remaining attempts.
func partialDeadline(now, deadline time.Time, remaining int) time.Time {
	const minimum = 2 * time.Second
	left := deadline.Sub(now)
	if remaining <= 1 || left <= minimum {
		return deadline
	}
	return now.Add(max(left/time.Duration(remaining), minimum))
}
