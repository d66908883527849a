package policy

import (
	"slices"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to Parse, as YAML or as JSON. Parse must
// never panic, and a policy it accepts must answer exactly what its file
// says: Allowed, AllowedAnyTenant and GrantableScopes are checked against a
// plain reading of the decoded file, so an action, principal or tenant that
// no grant names is never allowed. The seed corpus is in
// testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add([]byte(goodYAML), false)
	f.Add([]byte(goodJSON), true)
	f.Fuzz(func(t *testing.T, data []byte, isJSON bool) {
		format := FormatYAML
		if isJSON {
			format = FormatJSON
		}
		p, err := Parse(data, format)
		if err != nil {
			if p != nil {
				t.Fatal("Parse returned a policy with an error")
			}
			return
		}
		var fl file
		if isJSON {
			err = decodeJSON(data, &fl)
		} else {
			err = decodeYAML(data, &fl)
		}
		if err != nil {
			t.Fatalf("Parse accepted what decoding rejects: %v", err)
		}
		checkAgainstFile(t, p, &fl)
	})
}

// checkAgainstFile compares p's answers with a direct reading of f for the
// principals and tenants f names plus ones it does not, and every action
// (including an unknown one).
func checkAgainstFile(t *testing.T, p *Policy, f *file) {
	principals := []string{"not-in-the-file\x00"}
	tenants := []string{"not-in-the-file"}
	for _, g := range f.Grants {
		for _, raw := range g.Principals {
			principals = append(principals, raw, canonical(f, raw))
		}
		for _, tenant := range g.Tenants {
			if tenant != "*" {
				tenants = append(tenants, tenant)
			}
		}
	}
	principals, tenants = capped(principals), capped(tenants)
	all := append(slices.Clone(actions), Action("credentials.delete"))
	for _, principal := range principals {
		for _, a := range all {
			if got, want := p.AllowedAnyTenant(principal, a), fileAllows(f, principal, a, ""); got != want {
				t.Fatalf("AllowedAnyTenant(%q, %q) = %v, the file says %v", principal, a, got, want)
			}
			for _, tenant := range tenants {
				if got, want := p.Allowed(principal, a, tenant), fileAllows(f, principal, a, tenant); got != want {
					t.Fatalf("Allowed(%q, %q, %q) = %v, the file says %v", principal, a, tenant, got, want)
				}
			}
		}
		for _, tenant := range tenants {
			if got, want := p.GrantableScopes(principal, tenant), fileScopes(f, principal, tenant); !slices.Equal(got, want) {
				t.Fatalf("GrantableScopes(%q, %q) = %q, the file says %q", principal, tenant, got, want)
			}
		}
	}
}

// capped keeps the checks quadratic in a small number, whatever the input.
func capped(s []string) []string {
	return s[:min(len(s), 16)]
}

// fileAllows reads f literally; tenant "" means any tenant.
func fileAllows(f *file, principal string, a Action, tenant string) bool {
	for _, g := range f.Grants {
		tenantOK := tenant == "" || slices.Contains(g.Tenants, "*") || slices.Contains(g.Tenants, tenant)
		names := slices.ContainsFunc(g.Principals, func(raw string) bool { return canonical(f, raw) == principal })
		if names && slices.Contains(g.Actions, string(a)) && tenantOK {
			return true
		}
	}
	return false
}

// canonical is the principal a grant's raw name stands for, read by the
// rules of docs/security.md: dns: names in lower case, an unprefixed name of
// an API key as key:<name>.
func canonical(f *file, raw string) string {
	switch {
	case strings.HasPrefix(raw, "dns:"):
		return strings.ToLower(raw)
	case strings.Contains(raw, "://"), strings.HasPrefix(raw, "cn:"), strings.HasPrefix(raw, "key:"):
		return raw
	}
	for _, k := range f.APIKeys {
		if k.Principal == raw {
			return "key:" + raw
		}
	}
	return raw
}

func fileScopes(f *file, principal, tenant string) []string {
	union := map[string]bool{}
	for _, g := range f.Grants {
		single := file{APIKeys: f.APIKeys, Grants: []grantEntry{g}}
		if !fileAllows(&single, principal, SessionsIssue, tenant) {
			continue
		}
		if g.Scopes == nil {
			union[ScopeRead] = true
		}
		for _, s := range g.Scopes {
			union[s] = true
		}
	}
	var out []string
	for _, s := range []string{ScopeRead, ScopeRaw} {
		if union[s] {
			out = append(out, s)
		}
	}
	return out
}
