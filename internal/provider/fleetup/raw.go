package fleetup

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// DefaultRawPaths are the FleetUp endpoints CallProvider may reach when the
// operator names none (--fleetup-raw-paths): documented reads of devices,
// locations, trips, alerts and maintenance (FleetUp's API reference, as
// listed in shared/reference/fleetup-jwt-token.txt). Left out on purpose:
// /token (minting is the broker's), commands and writes (/devices/unlock,
// /tripshare/share, settings), people (/users, /drivers/list), and paths
// with a parameter segment, which an exact list cannot tell from a command
// (/devices/{device-id} and /devices/unlock have the same shape).
var DefaultRawPaths = []string{
	"/devices",
	"/devices/status",
	"/devices/driver-overview",
	"/devices/engine-hours",
	"/devices/fuel-level",
	"/devices/odometer",
	"/devices/latest-ecu-data",
	"/gpsdata",
	"/gpsdata/device-last-location",
	"/gpsdata/latest",
	"/bulk-gpsdata",
	"/trips/history",
	"/trips/ongoing-trips",
	"/alerts/summary",
	"/alerts/history",
	"/alerts/bulk-history",
	"/fencealerts/fence-names",
	"/fencealerts/geo-fencealerts",
	"/maintenance/history",
	"/maintenance/indicators",
}

// rawMethods are the methods of FleetUp's reads: its data calls are POSTs
// with a JSON body (upstream-facts.md), some lookups GETs. Nothing that
// FleetUp would read as a change (PUT, PATCH, DELETE) passes.
var rawMethods = []string{http.MethodGet, http.MethodPost}

// RawPaths is the allow-list of the raw pass-through: exact paths, compared
// byte for byte after a strict syntax check, so no spelling of /token —
// "/token.", "/TOKEN", "/devices/../token", "%2e%2e", "//token" — reaches
// FleetUp. The zero value and nil allow nothing.
type RawPaths struct {
	paths []string
}

// NewRawPaths checks an operator's list (nil or empty: DefaultRawPaths).
// Every entry must be a clean path of segments of letters, digits, '-' and
// '_', and none may be /token.
func NewRawPaths(paths []string) (*RawPaths, error) {
	if len(paths) == 0 {
		paths = DefaultRawPaths
	}
	r := &RawPaths{}
	for _, p := range paths {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if reason := pathSyntax(p); reason != "" {
			return nil, fmt.Errorf("fleetup raw path %q: %s", p, reason)
		}
		if strings.EqualFold(p, pathToken) {
			return nil, fmt.Errorf("fleetup raw path %q: minting is reserved for the broker", p)
		}
		r.paths = append(r.paths, p)
	}
	if len(r.paths) == 0 {
		return nil, fmt.Errorf("fleetup raw paths: the list is empty")
	}
	slices.Sort(r.paths)
	return r, nil
}

// Paths returns the allowed paths, sorted.
func (r *RawPaths) Paths() []string {
	if r == nil {
		return nil
	}
	return slices.Clone(r.paths)
}

// Check refuses a raw call before anything is sent: a malformed path is a
// *provider.FieldError (INVALID_ARGUMENT), a method or path not on the list
// an *upstream.Error of KindAccessDenied (PERMISSION_DENIED). target may
// carry a query of letters, digits and "=&_.%-" (as the contract allows);
// only the path before it is matched.
func (r *RawPaths) Check(method, target string) error {
	path, query, hasQuery := strings.Cut(target, "?")
	reason := pathSyntax(path)
	if reason == "" && hasQuery && strings.ContainsFunc(query, func(c rune) bool { return !isQueryChar(c) }) {
		reason = "the query may hold only letters, digits and =&_.%-"
	}
	if reason != "" {
		return &provider.FieldError{Field: "fleetup.path", Description: reason}
	}
	op := method + " " + path
	if !slices.Contains(rawMethods, method) {
		return &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: "raw",
			Reason: "the raw pass-through sends only GET and POST reads"}
	}
	if r == nil || !slices.Contains(r.paths, path) {
		return &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: op,
			Reason: "the path is not on this gateway's raw allow-list (--fleetup-raw-paths)"}
	}
	return nil
}

// isQueryChar: what telematics.v1 FleetUpCall.path allows after '?'.
func isQueryChar(c rune) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("=&_.%-", c)
}

// pathSyntax says what is wrong with p as a raw path, or "". Only '/' and
// segments of [A-Za-z0-9_-] pass: no dots (so no "..", "." or suffix such as
// "/token."), no empty segment ("//", a trailing '/'), no escapes or
// fragment, nothing a server might decode into another path.
func pathSyntax(p string) string {
	switch {
	case p == "" || p[0] != '/':
		return "must be an absolute path such as /devices"
	case len(p) > 256:
		return "is too long"
	}
	for _, seg := range strings.Split(p[1:], "/") {
		if seg == "" {
			return "has an empty segment"
		}
		for _, r := range seg {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return "segments may hold only letters, digits, '-' and '_'"
			}
		}
	}
	return ""
}
