package upstream

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// The providers' public API hosts. They are always allowed (over https only),
// whatever the configured list says, so a broker with an empty list still
// serves every customer of the hosted platforms.
const (
	DefaultWialonBaseURL  = "https://hst-api.wialon.com"
	DefaultFleetUpBaseURL = "https://api.fleetup.net"
)

// WialonHostedBaseURLs are the API hosts of every Wialon Hosting data
// centre (upstream-facts.md, "Transport"); a customer's token works only
// on its own data centre's host, so all of them are allowed by default.
var WialonHostedBaseURLs = []string{
	"https://hst-api.wialon.com",
	"https://hst-api.wialon.eu",
	"https://hst-api.wialon.us",
	"https://hst-api.wialon.org",
}

// ErrNotAllowed is wrapped by every error Check returns, so callers can map
// any refusal to one status (e.g. INVALID_ARGUMENT) with errors.Is.
var ErrNotAllowed = errors.New("upstream base URL not allowed")

// AllowList decides which upstream hosts the broker may call. A credential
// may carry its own base URL (self-hosted Wialon); without this check a
// tenant could aim the broker at internal addresses (SSRF).
//
// The zero value and a nil *AllowList allow only the provider defaults.
type AllowList struct {
	entries []allowEntry
}

type allowEntry struct {
	host string // lower case, no trailing dot
	port string // "" matches any port
	// httpsOnly marks the built-in provider defaults: they are allowed
	// because they are public TLS endpoints, never over plain http.
	httpsOnly bool
}

var defaultEntries = []allowEntry{
	{host: "hst-api.wialon.com", port: "443", httpsOnly: true},
	{host: "hst-api.wialon.eu", port: "443", httpsOnly: true},
	{host: "hst-api.wialon.us", port: "443", httpsOnly: true},
	{host: "hst-api.wialon.org", port: "443", httpsOnly: true},
	{host: "api.fleetup.net", port: "443", httpsOnly: true},
}

// ParseAllowList parses a comma-separated list of host[:port] entries, e.g.
// "wialon.example.com, 127.0.0.1:8080, [::1]:9000". Blank entries are
// ignored; an entry without a port matches any port. Host names compare
// case-insensitively. Wildcards, schemes, paths and user info are refused:
// the list is security configuration, and a typo should fail loudly at
// start-up rather than silently allow more than intended.
func ParseAllowList(s string) (*AllowList, error) {
	a := &AllowList{}
	for _, raw := range strings.Split(s, ",") {
		entry := strings.TrimSpace(raw)
		if entry == "" {
			continue
		}
		e, err := parseEntry(entry)
		if err != nil {
			// The list is operator configuration, not a secret: naming the
			// entry is what makes the error actionable.
			return nil, fmt.Errorf("allow-list entry %q: %w", entry, err)
		}
		a.entries = append(a.entries, e)
	}
	return a, nil
}

func parseEntry(entry string) (allowEntry, error) {
	if strings.ContainsAny(entry, "/@?#*") || strings.Contains(entry, "://") {
		return allowEntry{}, errors.New("must be host or host:port (no scheme, path, user info or wildcard)")
	}
	if strings.HasSuffix(entry, ":") {
		return allowEntry{}, errors.New("empty port")
	}
	host, port := entry, ""
	if strings.HasPrefix(entry, "[") || strings.Count(entry, ":") == 1 {
		h, p, err := net.SplitHostPort(entry)
		if err != nil {
			// "[::1]" (bracketed IPv6 without port) is not accepted by
			// SplitHostPort; allow it explicitly.
			if strings.HasPrefix(entry, "[") && strings.HasSuffix(entry, "]") {
				h, p = strings.Trim(entry, "[]"), ""
			} else {
				return allowEntry{}, errors.New("malformed host:port")
			}
		}
		host, port = h, p
		if port != "" {
			n, err := strconv.Atoi(port)
			if err != nil || n < 1 || n > 65535 {
				return allowEntry{}, errors.New("port must be a number from 1 to 65535")
			}
			port = strconv.Itoa(n) // normalise "08080"
		}
	}
	host = normalizeHost(host)
	if host == "" {
		return allowEntry{}, errors.New("empty host")
	}
	return allowEntry{host: host, port: port}, nil
}

func normalizeHost(h string) string {
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

// Check reports whether the broker may call baseURL. It accepts only
// absolute http(s) URLs without user info, query or fragment, whose host
// (and port, when the matching entry names one) is on the list.
//
// https is accepted for every listed host. Plain http is accepted only for
// hosts listed explicitly — never for the built-in defaults — because the
// loopback simulator used in dev and tests speaks plain http; production
// lists should name only TLS hosts.
//
// Error texts never repeat the URL: a mistyped base URL may carry a token in
// its user info or query. Only the scheme and host, once known to be free of
// user info, are named.
//
// Check does not resolve names. The addresses a name resolves to are
// checked when a connection is made, by DialContext (NewTransport): an
// internal address is refused unless an explicit entry names the host,
// whose DNS is then the operator's decision.
func (a *AllowList) Check(baseURL string) error {
	u, err := url.Parse(baseURL)
	if err != nil {
		return fmt.Errorf("%w: not a valid URL", ErrNotAllowed)
	}
	if u.User != nil {
		return fmt.Errorf("%w: must not contain user info", ErrNotAllowed)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(baseURL, "#") {
		return fmt.Errorf("%w: must not contain a query or fragment", ErrNotAllowed)
	}
	switch u.Scheme {
	case "https", "http":
	case "":
		return fmt.Errorf("%w: must be an absolute http(s) URL", ErrNotAllowed)
	default:
		return fmt.Errorf("%w: scheme %q is not http or https", ErrNotAllowed, u.Scheme)
	}
	if u.Opaque != "" || u.Host == "" {
		return fmt.Errorf("%w: must be an absolute http(s) URL with a host", ErrNotAllowed)
	}
	host := normalizeHost(u.Hostname())
	if host == "" {
		return fmt.Errorf("%w: empty host", ErrNotAllowed)
	}
	port := u.Port()
	if port == "" {
		port = "443"
		if u.Scheme == "http" {
			port = "80"
		}
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%w: invalid port", ErrNotAllowed)
	} else {
		port = strconv.Itoa(n)
	}

	for _, e := range a.all() {
		if e.host != host || (e.port != "" && e.port != port) {
			continue
		}
		if e.httpsOnly && u.Scheme != "https" {
			continue
		}
		return nil
	}
	return fmt.Errorf("%w: %s://%s is not on the allow-list", ErrNotAllowed, u.Scheme, u.Host)
}

// all returns the explicit entries followed by the defaults. Explicit entries
// come first so that an operator listing a default host for http (odd, but
// possible behind a TLS-terminating proxy) is honoured.
func (a *AllowList) all() []allowEntry {
	if a == nil {
		return defaultEntries
	}
	out := make([]allowEntry, 0, len(a.entries)+len(defaultEntries))
	out = append(out, a.entries...)
	return append(out, defaultEntries...)
}
