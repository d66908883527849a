// Package policy decides which caller (principal) may perform which action
// for which tenant, and which session scopes a caller may grant when it
// issues a session handle.
//
// A principal is a caller identity with its source prefix (package authn):
// the URI SAN of an mTLS client certificate (e.g.
// spiffe://example.org/ns/billing/sa/api), "dns:" + its DNS SAN, "cn:" + its
// subject CN, or "key:" + the name of a configured API key for callers that
// cannot use mTLS. The policy
// holds only the SHA-256 of each API key, never the key itself: a policy file
// or a dump of a Policy value cannot be used to call the broker.
//
// Policies are read from a YAML or JSON file (see Parse for the format) and
// reloaded while the process runs (see Watch). Everything not granted is
// denied.
package policy

import (
	"crypto/sha256"
	"crypto/subtle"
)

// Action is something a principal may be allowed to do.
type Action string

// The actions a policy can grant.
const (
	CredentialsRead  Action = "credentials.read"
	CredentialsWrite Action = "credentials.write"
	SessionsIssue    Action = "sessions.issue"
	SessionsRevoke   Action = "sessions.revoke"
	// SessionsResolve turns a handle into its credential (and its secret).
	// By convention of the policy author, only the gateway's principal holds
	// it: the policy cannot know which principal is the gateway.
	SessionsResolve Action = "sessions.resolve"
)

// actions lists every known action, in a stable order.
var actions = []Action{CredentialsRead, CredentialsWrite, SessionsIssue, SessionsRevoke, SessionsResolve}

// Session scopes a grant may let its principals put on the handles they issue.
const (
	ScopeRead = "read"
	ScopeRaw  = "raw"
)

// scopes lists every known scope, in the order GrantableScopes returns them.
var scopes = []string{ScopeRead, ScopeRaw}

// Policy is a parsed, validated policy. It is immutable and safe for
// concurrent use. A nil or zero Policy denies everything.
type Policy struct {
	// allowAll is set only by AllowAll.
	allowAll bool
	// byPrincipal indexes the grants by each principal they name, so a check
	// looks only at the caller's own grants.
	byPrincipal map[string][]*grant
	grantCount  int
	apiKeys     []apiKey
	// warnings are old forms the file still uses (see Warnings).
	warnings []string
}

// Warnings lists what the policy file should change although it still
// loads, e.g. a principal without a source prefix read as an API key's.
func (p *Policy) Warnings() []string {
	if p == nil {
		return nil
	}
	return p.warnings
}

type grant struct {
	allTenants bool            // tenants: ["*"]
	tenants    map[string]bool // the listed tenants otherwise
	actions    map[Action]bool
	scopes     map[string]bool
}

// apiKey is a configured API key, known only by its SHA-256.
type apiKey struct {
	principal string
	hash      [sha256.Size]byte
}

func (g *grant) covers(tenant string) bool {
	return g.allTenants || g.tenants[tenant]
}

// AllowAll returns a policy that lets every principal perform every action
// for every tenant, and grant every scope.
//
// DEVELOPMENT ONLY: it is what `fleetbroker dev` runs with, where no caller
// is authenticated. Never use it in a service that holds real credentials:
// anyone who reaches such a service can read every tenant's secrets.
func AllowAll() *Policy {
	return &Policy{allowAll: true}
}

// Allowed reports whether principal may perform action for tenant. An
// empty principal, or a tenant that is not a valid tenant id (including the
// wildcard "*" itself), is never allowed: handlers that do not know the
// tenant yet use AllowedAnyTenant.
func (p *Policy) Allowed(principal string, action Action, tenant string) bool {
	if p == nil || principal == "" || !validTenant(tenant) {
		return false
	}
	if p.allowAll {
		return true
	}
	for _, g := range p.byPrincipal[principal] {
		if g.actions[action] && g.covers(tenant) {
			return true
		}
	}
	return false
}

// AllowedAnyTenant reports whether principal may perform action for at
// least one tenant. Handlers use it before they know the tenant (e.g. before
// a handle is resolved), and must still call Allowed once they do.
func (p *Policy) AllowedAnyTenant(principal string, action Action) bool {
	if p == nil || principal == "" {
		return false
	}
	if p.allowAll {
		return true
	}
	for _, g := range p.byPrincipal[principal] {
		if g.actions[action] {
			return true
		}
	}
	return false
}

// GrantableScopes returns the session scopes principal may put on a handle
// it issues for tenant: the union of the scopes of every grant that gives it
// sessions.issue on that tenant, in the order read, raw. It is empty when
// principal may not issue sessions for tenant.
func (p *Policy) GrantableScopes(principal, tenant string) []string {
	if !p.Allowed(principal, SessionsIssue, tenant) {
		return nil
	}
	if p.allowAll {
		return append([]string(nil), scopes...)
	}
	union := make(map[string]bool, len(scopes))
	for _, g := range p.byPrincipal[principal] {
		if g.actions[SessionsIssue] && g.covers(tenant) {
			for s := range g.scopes {
				union[s] = true
			}
		}
	}
	var out []string
	for _, s := range scopes {
		if union[s] {
			out = append(out, s)
		}
	}
	return out
}

// PrincipalForAPIKey returns the principal ("key:<name>") whose configured hash is the
// SHA-256 of key. Every configured hash is compared, in constant time, so
// the time taken says nothing about which hash (if any) matched or how much
// of it did.
func (p *Policy) PrincipalForAPIKey(key string) (string, bool) {
	if p == nil || key == "" {
		return "", false
	}
	sum := sha256.Sum256([]byte(key))
	match := -1
	for i := range p.apiKeys {
		if subtle.ConstantTimeCompare(sum[:], p.apiKeys[i].hash[:]) == 1 {
			match = i
		}
	}
	if match < 0 {
		return "", false
	}
	return p.apiKeys[match].principal, true
}

// validTenant reports whether s matches ^[A-Za-z0-9][A-Za-z0-9._-]*$ and
// the tenant id length limit of the API. It is hand-written because Allowed
// runs on every call.
func validTenant(s string) bool {
	if s == "" || len(s) > maxTenantLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return false
		}
	}
	return true
}

// maxTenantLen is the longest tenant id the API accepts (tenant_id max_len).
const maxTenantLen = 64
