package policy

import (
	"crypto/sha256"
	"fmt"
	"slices"
	"strings"
	"testing"
)

const (
	billingKey = "billing-batch-secret-key-0001" // sha256 410e3441…
	opsKey     = "ops-cli-secret-key-0002"       // sha256 2ac42627…
	billingAPI = "spiffe://example.org/ns/billing/sa/api"
	gateway    = "spiffe://example.org/ns/fleetbroker/sa/gateway"
)

const goodYAML = `
# API keys for callers that cannot use mTLS: only the SHA-256 (hex) of each key.
api_keys:
  - principal: key:billing-batch
    sha256: "410e3441d83a2dccbda7535c89679e2efb306f9ee0e6e32940a56d23361acfe8"
  - principal: key:ops-cli
    sha256: "2AC426276591BB02CDE44B4842A72A650B88660B6984D571660A989484F03019"
grants:
  - principals: ["spiffe://example.org/ns/billing/sa/api", "key:billing-batch", "dns:Batch.Billing.svc"]
    tenants: ["acme", "globex"]
    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
  - principals: ["spiffe://example.org/ns/fleetbroker/sa/gateway"]
    tenants: ["*"]
    actions: [sessions.resolve]
  - principals: ["key:ops-cli"]
    tenants: ["*"]
    actions: [credentials.read, sessions.issue]
    scopes: [read, raw]
  - principals: ["key:billing-batch"]
    tenants: [globex]
    actions: [sessions.issue]
    scopes: [raw]
`

const goodJSON = `{
	"api_keys": [
		{"principal": "key:billing-batch", "sha256": "410e3441d83a2dccbda7535c89679e2efb306f9ee0e6e32940a56d23361acfe8"},
		{"principal": "key:ops-cli", "sha256": "2AC426276591BB02CDE44B4842A72A650B88660B6984D571660A989484F03019"}
	],
	"grants": [
		{"principals": ["spiffe://example.org/ns/billing/sa/api", "key:billing-batch", "dns:Batch.Billing.svc"], "tenants": ["acme", "globex"],
		 "actions": ["credentials.read", "credentials.write", "sessions.issue", "sessions.revoke"]},
		{"principals": ["spiffe://example.org/ns/fleetbroker/sa/gateway"], "tenants": ["*"], "actions": ["sessions.resolve"]},
		{"principals": ["key:ops-cli"], "tenants": ["*"], "actions": ["credentials.read", "sessions.issue"], "scopes": ["read", "raw"]},
		{"principals": ["key:billing-batch"], "tenants": ["globex"], "actions": ["sessions.issue"], "scopes": ["raw"]}
	]
}`

// parseBoth parses the same policy written in YAML and in JSON, so every
// question below is asked of both decoders.
func parseBoth(t *testing.T) map[string]*Policy {
	t.Helper()
	out := map[string]*Policy{}
	for format, data := range map[string]string{FormatYAML: goodYAML, FormatJSON: goodJSON} {
		p, err := Parse([]byte(data), format)
		if err != nil {
			t.Fatalf("Parse(%s): %v", format, err)
		}
		out[format] = p
	}
	return out
}

func TestAllowed(t *testing.T) {
	tests := []struct {
		principal string
		action    Action
		tenant    string
		want      bool
	}{
		{billingAPI, CredentialsRead, "acme", true},
		{billingAPI, CredentialsWrite, "globex", true},
		{"key:billing-batch", SessionsRevoke, "acme", true},
		{"dns:batch.billing.svc", CredentialsWrite, "acme", true}, // DNS names compare in lower case
		{"billing-batch", SessionsRevoke, "acme", false},          // no prefix: nobody
		{"dns:billing-batch", SessionsRevoke, "acme", false},      // a DNS SAN is not the API key
		{"cn:key:billing-batch", SessionsRevoke, "acme", false},
		{billingAPI, CredentialsRead, "initech", false}, // tenant not listed
		{billingAPI, SessionsResolve, "acme", false},    // action not granted
		{billingAPI, CredentialsRead, "ACME", false},    // tenants are case-sensitive
		{gateway, SessionsResolve, "acme", true},        // "*"
		{gateway, SessionsResolve, "any.other-tenant", true},
		{gateway, CredentialsRead, "acme", false},
		{gateway, SessionsResolve, "*", false}, // "*" is not a tenant id
		{gateway, SessionsResolve, "", false},  // nor is ""
		{gateway, SessionsResolve, "-leading-dash", false},
		{"key:ops-cli", CredentialsRead, "initech", true},
		{"key:ops-cli", CredentialsWrite, "initech", false},
		{"unknown", CredentialsRead, "acme", false},
		{"", CredentialsRead, "acme", false},
		{billingAPI, Action("credentials.delete"), "acme", false},
	}
	for format, p := range parseBoth(t) {
		for _, tt := range tests {
			if got := p.Allowed(tt.principal, tt.action, tt.tenant); got != tt.want {
				t.Errorf("%s: Allowed(%q, %q, %q) = %v, want %v", format, tt.principal, tt.action, tt.tenant, got, tt.want)
			}
		}
	}
}

func TestAllowedAnyTenant(t *testing.T) {
	tests := []struct {
		principal string
		action    Action
		want      bool
	}{
		{billingAPI, CredentialsWrite, true},
		{billingAPI, SessionsResolve, false},
		{gateway, SessionsResolve, true},
		{gateway, SessionsIssue, false},
		{"key:ops-cli", CredentialsWrite, false},
		{"unknown", CredentialsRead, false},
		{"", SessionsResolve, false},
	}
	for format, p := range parseBoth(t) {
		for _, tt := range tests {
			if got := p.AllowedAnyTenant(tt.principal, tt.action); got != tt.want {
				t.Errorf("%s: AllowedAnyTenant(%q, %q) = %v, want %v", format, tt.principal, tt.action, got, tt.want)
			}
		}
	}
}

func TestGrantableScopes(t *testing.T) {
	tests := []struct {
		principal, tenant string
		want              []string
	}{
		{billingAPI, "acme", []string{ScopeRead}},                      // scopes omitted: [read]
		{"key:billing-batch", "acme", []string{ScopeRead}},             // the raw grant is for globex only
		{"key:billing-batch", "globex", []string{ScopeRead, ScopeRaw}}, // union of two grants
		{"key:ops-cli", "initech", []string{ScopeRead, ScopeRaw}},      // "*"
		{billingAPI, "initech", nil},                                   // no sessions.issue there
		{gateway, "acme", nil},
		{"unknown", "acme", nil},
	}
	for format, p := range parseBoth(t) {
		for _, tt := range tests {
			if got := p.GrantableScopes(tt.principal, tt.tenant); !slices.Equal(got, tt.want) {
				t.Errorf("%s: GrantableScopes(%q, %q) = %q, want %q", format, tt.principal, tt.tenant, got, tt.want)
			}
		}
	}
}

func TestPrincipalForAPIKey(t *testing.T) {
	tests := []struct {
		key, want string
		ok        bool
	}{
		{billingKey, "key:billing-batch", true},
		{opsKey, "key:ops-cli", true}, // hash configured in upper case
		{billingKey + " ", "", false},
		{"410e3441d83a2dccbda7535c89679e2efb306f9ee0e6e32940a56d23361acfe8", "", false}, // the hash is not a key
		{"", "", false},
	}
	for format, p := range parseBoth(t) {
		for _, tt := range tests {
			got, ok := p.PrincipalForAPIKey(tt.key)
			if got != tt.want || ok != tt.ok {
				t.Errorf("%s: PrincipalForAPIKey(%q) = %q, %v; want %q, %v", format, tt.key, got, ok, tt.want, tt.ok)
			}
		}
	}
}

// TestEmptyKeyNeverMatches builds, by hand, the policy Parse refuses: one
// with the hash of the empty key. An empty key must still be refused.
func TestEmptyKeyNeverMatches(t *testing.T) {
	p := &Policy{apiKeys: []apiKey{{principal: "p", hash: sha256.Sum256(nil)}}}
	if got, ok := p.PrincipalForAPIKey(""); ok {
		t.Errorf("the empty key is accepted, as %q", got)
	}
}

// TestPolicyHoldsNoKeys dumps the Policy value: the keys must not be in it,
// only their hashes.
func TestPolicyHoldsNoKeys(t *testing.T) {
	for format, p := range parseBoth(t) {
		for _, verb := range []string{"%+v", "%#v"} {
			dump := fmt.Sprintf(verb, *p)
			for _, key := range []string{billingKey, opsKey} {
				if strings.Contains(dump, key) {
					t.Errorf("%s: %s of the policy contains the key %q", format, verb, key)
				}
			}
		}
	}
}

func TestAllowAll(t *testing.T) {
	p := AllowAll()
	for _, a := range actions {
		if !p.Allowed("anyone", a, "any-tenant") || !p.AllowedAnyTenant("anyone", a) {
			t.Errorf("AllowAll denies %q", a)
		}
	}
	if got := p.GrantableScopes("anyone", "t"); !slices.Equal(got, []string{ScopeRead, ScopeRaw}) {
		t.Errorf("AllowAll GrantableScopes = %q", got)
	}
	if _, ok := p.PrincipalForAPIKey("anything"); ok {
		t.Error("AllowAll knows an API key")
	}
	if p.Allowed("", CredentialsRead, "t") {
		t.Error("AllowAll allows an empty principal")
	}
}

func TestZeroAndNilPolicyDenyEverything(t *testing.T) {
	for name, p := range map[string]*Policy{"zero": {}, "nil": nil} {
		_, keyOK := p.PrincipalForAPIKey("k")
		if p.Allowed("a", CredentialsRead, "t") || p.AllowedAnyTenant("a", CredentialsRead) || p.GrantableScopes("a", "t") != nil || keyOK {
			t.Errorf("the %s Policy allows something", name)
		}
	}
}

func TestParseRejects(t *testing.T) {
	const grant = "grants:\n  - principals: ['dns:p']\n    tenants: [t]\n    actions: [credentials.read]\n"
	const hash = "410e3441d83a2dccbda7535c89679e2efb306f9ee0e6e32940a56d23361acfe8"
	tests := []struct {
		name, format, data, want string
	}{
		{"empty file", FormatYAML, "", "empty policy"},
		{"comments only", FormatYAML, "# nothing\n", "empty policy"},
		{"empty JSON", FormatJSON, " \n", "empty policy"},
		{"no grants", FormatYAML, "grants: []\n", "grants: none given"},
		{"JSON null", FormatJSON, "null", "grants: none given"},
		{"unknown format", "toml", grant, `unknown format "toml"`},
		{"unknown top-level field", FormatYAML, grant + "admins: [x]\n", "field admins not found"},
		{"unknown grant field", FormatYAML, "grants:\n  - principals: ['dns:p']\n    tenant: [t]\n    actions: [credentials.read]\n", "field tenant not found"},
		{"unknown JSON field", FormatJSON, `{"grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": ["credentials.read"], "role": "x"}]}`, `unknown field "role"`},
		{"repeated YAML key", FormatYAML, grant + "grants: []\n", `mapping key "grants" already defined`},
		{"repeated JSON key", FormatJSON, `{"grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": ["credentials.read"]}], "Grants": []}`, `JSON key "Grants" repeated`},
		{"second YAML document", FormatYAML, grant + "---\n" + grant, "more than one YAML document"},
		{"trailing JSON", FormatJSON, `{"grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": ["credentials.read"]}]} {}`, "data after the top-level JSON value"},
		{"unknown action", FormatYAML, grant + "  - principals: ['dns:p']\n    tenants: [t]\n    actions: [sessions.issue, credentials.delete]\n", `grants[1].actions[1]: unknown action "credentials.delete"`},
		{"unknown JSON action", FormatJSON, `{"grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": ["credentials.delete"]}]}`, `grants[0].actions[0]: unknown action "credentials.delete"`},
		{"unknown scope", FormatYAML, grant + "    scopes: [read, write]\n", `grants[0].scopes[1]: unknown scope "write"`},
		{"empty scopes", FormatYAML, grant + "    scopes: []\n", "grants[0].scopes: empty list"},
		{"empty principals", FormatYAML, "grants:\n  - principals: []\n    tenants: [t]\n    actions: [credentials.read]\n", "grants[0].principals: empty list"},
		{"missing tenants", FormatYAML, "grants:\n  - principals: ['dns:p']\n    actions: [credentials.read]\n", "grants[0].tenants: empty list"},
		{"empty actions", FormatJSON, `{"grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": []}]}`, "grants[0].actions: empty list"},
		{"empty principal", FormatYAML, "grants:\n  - principals: ['dns:p', '']\n    tenants: [t]\n    actions: [credentials.read]\n", "grants[0].principals[1]: empty principal"},
		{"wildcard principal", FormatYAML, "grants:\n  - principals: ['*']\n    tenants: [t]\n    actions: [credentials.read]\n", `grants[0].principals[0]: "*" is not allowed`},
		{"principal with space", FormatYAML, "grants:\n  - principals: ['a b']\n    tenants: [t]\n    actions: [credentials.read]\n", "grants[0].principals[0]: principal \"a b\" contains a space"},
		{"bad tenant", FormatYAML, "grants:\n  - principals: ['dns:p']\n    tenants: [acme, 'a/b']\n    actions: [credentials.read]\n", `grants[0].tenants[1]: invalid tenant "a/b"`},
		{"tenant glob", FormatYAML, "grants:\n  - principals: ['dns:p']\n    tenants: ['acme*']\n    actions: [credentials.read]\n", `grants[0].tenants[0]: invalid tenant "acme*"`},
		{"tenant too long", FormatYAML, "grants:\n  - principals: ['dns:p']\n    tenants: [" + strings.Repeat("t", 65) + "]\n    actions: [credentials.read]\n", "grants[0].tenants[0]: invalid tenant"},
		{"short sha256", FormatYAML, "api_keys:\n  - principal: k\n    sha256: " + hash[:63] + "\n" + grant, "api_keys[0].sha256: must be 64 hexadecimal characters"},
		{"non-hex sha256", FormatYAML, "api_keys:\n  - principal: k\n    sha256: " + hash[:63] + "g\n" + grant, "api_keys[0].sha256: must be 64 hexadecimal characters"},
		{"missing sha256", FormatJSON, `{"api_keys": [{"principal": "k"}], "grants": [{"principals": ["dns:p"], "tenants": ["t"], "actions": ["credentials.read"]}]}`, "api_keys[0].sha256: must be 64"},
		{"missing key principal", FormatYAML, "api_keys:\n  - sha256: " + hash + "\n" + grant, "api_keys[0].principal: empty principal"},
		{"URI key principal", FormatYAML, "api_keys:\n  - principal: spiffe://example.org/ns/fleetbroker/sa/gateway\n    sha256: " + hash + "\n" + grant, "api_keys[0].principal: \"spiffe://example.org/ns/fleetbroker/sa/gateway\" looks like a certificate URI"},
		{"duplicate key principal", FormatYAML, "api_keys:\n  - principal: k\n    sha256: " + hash + "\n  - principal: k\n    sha256: " + strings.Repeat("0", 64) + "\n" + grant, `api_keys[1].principal: "k" already has a key at api_keys[0]`},
		{"hash of the empty key", FormatYAML, "api_keys:\n  - principal: k\n    sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n" + grant, "api_keys[0].sha256: is the SHA-256 of an empty key"},
		{"duplicate hash", FormatYAML, "api_keys:\n  - principal: k\n    sha256: " + hash + "\n  - principal: j\n    sha256: " + strings.ToUpper(hash) + "\n" + grant, "api_keys[1].sha256: same hash as api_keys[0].sha256"},
		{"principal without prefix", FormatYAML, "grants:\n  - principals: [billing]\n    tenants: [t]\n    actions: [credentials.read]\n", `grants[0].principals[0]: principal "billing" has no source prefix`},
		{"URI without authority", FormatYAML, "grants:\n  - principals: ['urn://']\n    tenants: [t]\n    actions: [credentials.read]\n", "a URI principal must be scheme://authority/path"},
		{"empty dns name", FormatYAML, "grants:\n  - principals: ['dns:']\n    tenants: [t]\n    actions: [credentials.read]\n", `want dns:<DNS name>`},
		{"empty key name", FormatYAML, "grants:\n  - principals: ['key:']\n    tenants: [t]\n    actions: [credentials.read]\n", `an API key name must be non-empty`},
		{"dns API key principal", FormatYAML, "api_keys:\n  - principal: dns:k\n    sha256: " + hash + "\n" + grant, `API key principals are key:<name>`},
		{"wrong type", FormatYAML, "grants: {principals: ['dns:p']}\n", "cannot unmarshal !!map into"},
		{"too large", FormatYAML, grant + "#" + strings.Repeat("x", maxSize), "larger than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse([]byte(tt.data), tt.format)
			if err == nil {
				t.Fatalf("Parse accepted it: %+v", p)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "policy: ") {
				t.Errorf("error %q does not start with %q", err, "policy: ")
			}
		})
	}
}

// TestParseErrorsHideKeys puts a key where its hash, or a list, belongs: the
// error must not repeat it, not even its first characters (yaml quotes
// seven), since reload errors are logged.
func TestParseErrorsHideKeys(t *testing.T) {
	const key = "fbk_LiveSecretValue1234567890"
	const grant = "grants:\n  - principals: [p]\n    tenants: [t]\n    actions: [credentials.read]\n"
	for name, data := range map[string]string{
		"key as sha256":       "api_keys:\n  - principal: k\n    sha256: " + key + "\n" + grant,
		"key as api_keys":     "api_keys: " + key + "\n" + grant,
		"key as api_keys[0]":  "api_keys: [" + key + "]\n" + grant,
		"key as a principals": "grants:\n  - principals: " + key + "\n    tenants: [t]\n    actions: [credentials.read]\n",
	} {
		_, err := Parse([]byte(data), FormatYAML)
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		if strings.Contains(err.Error(), key[:7]) {
			t.Errorf("%s: error %q repeats part of the key", name, err)
		}
	}
}

// TestLegacyAPIKeyNames: a policy written before principals had source
// prefixes still loads where that is safe: an unprefixed name that is an API
// key's is read as key:<name>, and Warnings says to write it so. It no
// longer lets in a certificate whose DNS SAN or CN has that name.
func TestLegacyAPIKeyNames(t *testing.T) {
	const old = `api_keys:
  - principal: billing-batch
    sha256: "410e3441d83a2dccbda7535c89679e2efb306f9ee0e6e32940a56d23361acfe8"
grants:
  - principals: ["spiffe://example.org/ns/billing/sa/api", billing-batch]
    tenants: [acme]
    actions: [credentials.read]
`
	p, err := Parse([]byte(old), FormatYAML)
	if err != nil {
		t.Fatal(err)
	}
	if name, ok := p.PrincipalForAPIKey(billingKey); !ok || name != "key:billing-batch" {
		t.Errorf("PrincipalForAPIKey = %q, %v; want key:billing-batch", name, ok)
	}
	for principal, want := range map[string]bool{"key:billing-batch": true, billingAPI: true, "billing-batch": false, "dns:billing-batch": false, "cn:billing-batch": false} {
		if got := p.Allowed(principal, CredentialsRead, "acme"); got != want {
			t.Errorf("Allowed(%q) = %v, want %v", principal, got, want)
		}
	}
	if w := p.Warnings(); len(w) != 1 || !strings.Contains(w[0], `grants[0].principals[1]: "billing-batch" has no source prefix; read as "key:billing-batch"`) {
		t.Errorf("Warnings = %q", w)
	}
}

func TestFormatForPath(t *testing.T) {
	for path, want := range map[string]string{"a.yaml": FormatYAML, "/x/a.YML": FormatYAML, "a.json": FormatJSON, "a.toml": "", "yaml": ""} {
		got, err := FormatForPath(path)
		if got != want || (err != nil) != (want == "") {
			t.Errorf("FormatForPath(%q) = %q, %v; want %q", path, got, err, want)
		}
	}
}
