package authn

import "strings"

// XFCCHeader is the header Envoy (and so Istio's sidecar) sets to describe
// the client certificate it verified when it terminated mTLS.
const XFCCHeader = "x-forwarded-client-cert"

// FromXFCC returns the URI SAN of the client certificate described by the
// last element of an x-forwarded-client-cert value: the element the nearest
// proxy — the trusted sidecar — appended. Earlier elements were written by
// hops further away, or by the client itself, and are never believed. It
// reports false when that element carries no URI SAN in URI form.
//
// The format is Envoy's: elements separated by ',', each a ';'-separated
// list of key=value pairs, values optionally in double quotes (with \"
// escapes), e.g.
//
//	By=spiffe://cluster.local/ns/fleetbroker/sa/credentials;Hash=…;Subject="";URI=spiffe://cluster.local/ns/billing/sa/api
func FromXFCC(value string) (string, bool) {
	elements := splitQuoted(value, ',')
	if len(elements) == 0 {
		return "", false
	}
	var uri string
	found := 0
	for _, pair := range splitQuoted(elements[len(elements)-1], ';') {
		key, val, ok := strings.Cut(pair, "=")
		if !ok || !strings.EqualFold(strings.TrimSpace(key), "URI") {
			continue
		}
		uri, found = unquote(strings.TrimSpace(val)), found+1
	}
	// Envoy writes one URI per element; two would make the name ambiguous.
	if found != 1 || !IsURIName(uri) {
		return "", false
	}
	return uri, true
}

// splitQuoted splits s at sep outside double quotes.
func splitQuoted(s string, sep byte) []string {
	var out []string
	inQuotes, escaped, start := false, false, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case escaped:
			escaped = false
		case c == '\\' && inQuotes:
			escaped = true
		case c == '"':
			inQuotes = !inQuotes
		case c == sep && !inQuotes:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if inQuotes {
		return nil // malformed: an open quote
	}
	return append(out, s[start:])
}

func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return strings.ReplaceAll(v[1:len(v)-1], `\"`, `"`)
	}
	return v
}
