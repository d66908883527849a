package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/fleetbroker/fleetbroker/internal/authn"
)

// The file formats Parse understands.
const (
	FormatYAML = "yaml"
	FormatJSON = "json"
)

// maxSize bounds a policy file; real ones are a few kilobytes.
const maxSize = 1 << 20

// file is the on-disk shape of a policy.
type file struct {
	APIKeys []apiKeyEntry `yaml:"api_keys" json:"api_keys"`
	Grants  []grantEntry  `yaml:"grants" json:"grants"`
}

type apiKeyEntry struct {
	Principal string `yaml:"principal" json:"principal"`
	SHA256    string `yaml:"sha256" json:"sha256"`
}

type grantEntry struct {
	Principals []string `yaml:"principals" json:"principals"`
	Tenants    []string `yaml:"tenants" json:"tenants"`
	Actions    []string `yaml:"actions" json:"actions"`
	Scopes     []string `yaml:"scopes" json:"scopes"`
}

// FormatForPath returns the format of a policy file from its extension:
// .yaml and .yml are YAML, .json is JSON.
func FormatForPath(path string) (string, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".yaml", ".yml":
		return FormatYAML, nil
	case ".json":
		return FormatJSON, nil
	}
	return "", fmt.Errorf("policy: %s: unknown extension (want .yaml, .yml or .json)", path)
}

// Load reads and parses the policy file at path, in the format its
// extension names.
func Load(path string) (*Policy, error) {
	format, err := FormatForPath(path)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return Parse(data, format)
}

// Parse parses and validates a policy in format (FormatYAML or FormatJSON):
//
//	# API keys for callers that cannot use mTLS: only the SHA-256 (hex) of each key.
//	api_keys:
//	  - principal: key:billing-batch
//	    sha256: "3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea"
//	grants:
//	  - principals: ["spiffe://example.org/ns/billing/sa/api", "key:billing-batch", "dns:batch.billing.svc"]
//	    tenants: ["acme", "globex"]          # or ["*"] for every tenant
//	    actions: [credentials.read, credentials.write, sessions.issue, sessions.revoke]
//	    scopes: [read]                        # what sessions.issue may grant; default [read]
//	  - principals: ["spiffe://example.org/ns/fleetbroker/sa/gateway"]
//	    tenants: ["*"]
//	    actions: [sessions.resolve]
//
// Every principal says where it comes from (see package authn): a URI SAN
// as the URI, "dns:" a DNS SAN, "cn:" a subject CN, "key:" an API key. A
// name without a prefix is refused, except the old form of an API key's
// name, which is read as key:<name> and reported by Warnings.
//
// Decoding is strict (unknown or repeated fields are errors), and every
// value is checked; an error names the place, e.g.
// `grants[1].actions[0]: unknown action "credentials.delete"`. Errors never
// echo a sha256 value, in case a key was pasted where its hash belongs.
func Parse(data []byte, format string) (*Policy, error) {
	if len(data) > maxSize {
		return nil, fmt.Errorf("policy: larger than %d bytes", maxSize)
	}
	var f file
	var err error
	switch format {
	case FormatYAML:
		err = decodeYAML(data, &f)
	case FormatJSON:
		err = decodeJSON(data, &f)
	default:
		err = fmt.Errorf("unknown format %q (want %q or %q)", format, FormatYAML, FormatJSON)
	}
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	p, err := compile(&f)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return p, nil
}

var errEmpty = errors.New("empty policy")

// emptyKeyHash is the SHA-256 of "": configuring it would let a request with
// an empty bearer key in.
var emptyKeyHash = sha256.Sum256(nil)

func decodeYAML(data []byte, f *file) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(f); err != nil {
		if errors.Is(err, io.EOF) {
			return errEmpty
		}
		return scrubYAMLError(err)
	}
	// A second document would be ignored silently, along with its grants.
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return errors.New("more than one YAML document")
	}
	return nil
}

// scrubYAMLError drops the excerpt of the offending value that yaml puts in
// type errors ("cannot unmarshal !!str `abcdefg...` into ..."): it could be
// the start of a key pasted in the wrong place, and these errors are logged.
func scrubYAMLError(err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return err
	}
	msgs := make([]string, len(te.Errors))
	for i, m := range te.Errors {
		msgs[i] = dropValueExcerpt(m)
	}
	return errors.New(strings.Join(msgs, "; "))
}

func dropValueExcerpt(msg string) string {
	const lead, into = "cannot unmarshal ", " into "
	i, j := strings.Index(msg, lead), strings.LastIndex(msg, into)
	if i < 0 || j < i+len(lead) {
		return msg
	}
	tag, _, _ := strings.Cut(msg[i+len(lead):j], " ")
	return msg[:i+len(lead)] + tag + msg[j:]
}

func decodeJSON(data []byte, f *file) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return errEmpty
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(f); err != nil {
		return describeJSONError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("data after the top-level JSON value")
	}
	// Checked after decoding, which already bounded the nesting depth.
	return checkJSONDuplicateKeys(data)
}

// describeJSONError says where a syntax error is, and that it is JSON.
func describeJSONError(err error) error {
	var syntax *json.SyntaxError
	switch {
	case errors.As(err, &syntax):
		return fmt.Errorf("json: byte %d: %w", syntax.Offset, err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("json: unexpected end of input")
	}
	return err
}

// checkJSONDuplicateKeys rejects an object that repeats a key. encoding/json
// would keep the last value silently (and matches field names without
// regard to case), so {"grants": [...], "Grants": [...]} would drop grants
// without a word.
func checkJSONDuplicateKeys(data []byte) error {
	type frame struct {
		keys      map[string]bool // nil for an array
		expectKey bool
	}
	var stack []*frame
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if d, ok := tok.(json.Delim); ok && (d == '}' || d == ']') {
			stack = stack[:len(stack)-1]
			continue
		}
		if top != nil && top.keys != nil {
			if top.expectKey {
				key := strings.ToLower(tok.(string))
				if top.keys[key] {
					return fmt.Errorf("JSON key %q repeated in one object", tok)
				}
				top.keys[key] = true
				top.expectKey = false
				continue
			}
			top.expectKey = true // this token starts the value; a key follows it
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &frame{keys: map[string]bool{}, expectKey: true})
		case json.Delim('['):
			stack = append(stack, &frame{})
		}
	}
}

// compile validates f and builds the Policy that answers questions about it.
func compile(f *file) (*Policy, error) {
	if len(f.Grants) == 0 {
		return nil, errors.New("grants: none given: a policy without grants denies every call")
	}
	p := &Policy{byPrincipal: map[string][]*grant{}, grantCount: len(f.Grants)}
	keys, legacy, err := compileAPIKeys(f.APIKeys)
	if err != nil {
		return nil, err
	}
	p.apiKeys = keys
	for i := range f.Grants {
		at := fmt.Sprintf("grants[%d]", i)
		g, err := compileGrant(&f.Grants[i])
		if err != nil {
			return nil, fmt.Errorf("%s.%w", at, err)
		}
		for j, raw := range f.Grants[i].Principals {
			name, note, err := grantPrincipal(raw, legacy)
			if err != nil {
				return nil, fmt.Errorf("%s.principals[%d]: %w", at, j, err)
			}
			if note != "" {
				p.warnings = append(p.warnings, fmt.Sprintf("%s.principals[%d]: %s", at, j, note))
			}
			p.byPrincipal[name] = append(p.byPrincipal[name], g)
		}
	}
	return p, nil
}

// grantPrincipal returns the principal a grant names. A name without a
// source prefix is the old form: it is read as "key:<name>" when an API key
// of that name exists (safe: it can only narrow who matches, since the old
// reading also let a certificate's DNS SAN or CN of that name in), and
// refused otherwise, with the prefixed forms to choose from.
func grantPrincipal(raw string, legacyKeys map[string]bool) (name, note string, err error) {
	if err := checkPrincipal(raw); err != nil {
		return "", "", err
	}
	if hasSourcePrefix(raw) {
		name, err := normalizePrincipal(raw)
		return name, "", err
	}
	if legacyKeys[raw] {
		return authn.PrefixKey + raw, fmt.Sprintf("%q has no source prefix; read as %q (the API key of that name): write it so", raw, authn.PrefixKey+raw), nil
	}
	return "", "", fmt.Errorf("principal %q has no source prefix, so it could be a certificate's DNS SAN, its CN or an API key; "+
		"write %q for a DNS SAN, %q for a subject CN (needs --tls-client-cn-principals), %q for an API key, or the full URI SAN (spiffe://…)",
		raw, authn.PrefixDNS+raw, authn.PrefixCN+raw, authn.PrefixKey+raw)
}

// hasSourcePrefix reports whether name says where it comes from: a URI
// (scheme://…) or one of the prefixes dns:, cn:, key:.
func hasSourcePrefix(name string) bool {
	return strings.Contains(name, "://") || strings.HasPrefix(name, authn.PrefixDNS) ||
		strings.HasPrefix(name, authn.PrefixCN) || strings.HasPrefix(name, authn.PrefixKey)
}

// normalizePrincipal checks a prefixed principal and returns it in the form
// authn produces: DNS names in lower case.
func normalizePrincipal(name string) (string, error) {
	switch {
	case strings.HasPrefix(name, authn.PrefixDNS):
		host := strings.TrimPrefix(name, authn.PrefixDNS)
		if host == "" || strings.ContainsAny(host, "/:@") {
			return "", fmt.Errorf("principal %q: want dns:<DNS name>", name)
		}
		return authn.PrefixDNS + strings.ToLower(host), nil
	case strings.HasPrefix(name, authn.PrefixCN):
		if name == authn.PrefixCN {
			return "", fmt.Errorf("principal %q: want cn:<common name>", name)
		}
		return name, nil
	case strings.HasPrefix(name, authn.PrefixKey):
		if err := checkKeyName(strings.TrimPrefix(name, authn.PrefixKey)); err != nil {
			return "", fmt.Errorf("principal %q: %w", name, err)
		}
		return name, nil
	case authn.IsURIName(name):
		return name, nil
	}
	return "", fmt.Errorf("principal %q: a URI principal must be scheme://authority/path (e.g. spiffe://example.org/ns/billing/sa/api)", name)
}

// checkKeyName checks the name of an API key (what follows "key:").
func checkKeyName(n string) error {
	if n == "" || strings.ContainsAny(n, ":/") {
		return errors.New("an API key name must be non-empty, without ':' or '/'")
	}
	return nil
}

// compileAPIKeys validates the API keys. Each names its principal
// "key:<name>"; the old form "<name>" is accepted and returned in legacy, so
// grants that name it the old way still match it.
func compileAPIKeys(entries []apiKeyEntry) ([]apiKey, map[string]bool, error) {
	keys := make([]apiKey, 0, len(entries))
	legacy := map[string]bool{}
	byPrincipal := map[string]int{}
	byHash := map[[32]byte]int{}
	for i, e := range entries {
		at := fmt.Sprintf("api_keys[%d]", i)
		if err := checkPrincipal(e.Principal); err != nil {
			return nil, nil, fmt.Errorf("%s.principal: %w", at, err)
		}
		// A URI is an mTLS identity: a bearer key must not be able to pose
		// as a workload, such as the gateway, that proves itself by certificate.
		if strings.Contains(e.Principal, "://") {
			return nil, nil, fmt.Errorf("%s.principal: %q looks like a certificate URI; API key principals are key:<name>", at, e.Principal)
		}
		name := e.Principal
		if !strings.HasPrefix(name, authn.PrefixKey) {
			if hasSourcePrefix(name) {
				return nil, nil, fmt.Errorf("%s.principal: %q: API key principals are key:<name>", at, e.Principal)
			}
			legacy[name] = true
			name = authn.PrefixKey + name
		}
		if err := checkKeyName(strings.TrimPrefix(name, authn.PrefixKey)); err != nil {
			return nil, nil, fmt.Errorf("%s.principal: %w", at, err)
		}
		if j, dup := byPrincipal[name]; dup {
			return nil, nil, fmt.Errorf("%s.principal: %q already has a key at api_keys[%d]", at, e.Principal, j)
		}
		// Never echo the value: it may be a key pasted in place of its hash.
		raw, err := hex.DecodeString(e.SHA256)
		if err != nil || len(raw) != 32 {
			return nil, nil, fmt.Errorf("%s.sha256: must be 64 hexadecimal characters (the SHA-256 of the key, not the key)", at)
		}
		k := apiKey{principal: name, hash: [32]byte(raw)}
		if k.hash == emptyKeyHash {
			return nil, nil, fmt.Errorf("%s.sha256: is the SHA-256 of an empty key", at)
		}
		if j, dup := byHash[k.hash]; dup {
			return nil, nil, fmt.Errorf("%s.sha256: same hash as api_keys[%d].sha256", at, j)
		}
		byPrincipal[name], byHash[k.hash] = i, i
		keys = append(keys, k)
	}
	return keys, legacy, nil
}

// compileGrant validates one grant. Its errors start with the field name, so
// the caller can prefix "grants[i].".
func compileGrant(e *grantEntry) (*grant, error) {
	if len(e.Principals) == 0 {
		return nil, errors.New("principals: empty list")
	}
	g := &grant{tenants: map[string]bool{}, actions: map[Action]bool{}, scopes: map[string]bool{}}
	err := eachOf("tenants", e.Tenants, func(t string) error {
		if t == "*" {
			g.allTenants = true
			return nil
		}
		if !validTenant(t) {
			return fmt.Errorf("invalid tenant %q (want \"*\" or ^[A-Za-z0-9][A-Za-z0-9._-]*$, at most %d characters)", t, maxTenantLen)
		}
		g.tenants[t] = true
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = eachOf("actions", e.Actions, func(a string) error {
		if !knownAction(Action(a)) {
			return fmt.Errorf("unknown action %q", a)
		}
		g.actions[Action(a)] = true
		return nil
	})
	if err != nil {
		return nil, err
	}
	if e.Scopes == nil {
		g.scopes[ScopeRead] = true // the documented default
		return g, nil
	}
	err = eachOf("scopes", e.Scopes, func(s string) error {
		if s != ScopeRead && s != ScopeRaw {
			return fmt.Errorf("unknown scope %q (want %q or %q)", s, ScopeRead, ScopeRaw)
		}
		g.scopes[s] = true
		return nil
	})
	return g, err
}

// eachOf checks that list is not empty and runs check on every item,
// naming the failing item as field[i].
func eachOf(field string, list []string, check func(string) error) error {
	if len(list) == 0 {
		return fmt.Errorf("%s: empty list", field)
	}
	for i, item := range list {
		if err := check(item); err != nil {
			return fmt.Errorf("%s[%d]: %w", field, i, err)
		}
	}
	return nil
}

// checkPrincipal rejects principals that can never match a caller and would
// hide a typo: empty ones, ones with spaces or control characters, and "*",
// which is not a wildcard for principals.
func checkPrincipal(p string) error {
	switch {
	case p == "":
		return errors.New("empty principal")
	case p == "*":
		return errors.New(`"*" is not allowed: list principals explicitly`)
	case strings.ContainsFunc(p, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		return fmt.Errorf("principal %q contains a space or control character", p)
	}
	return nil
}

func knownAction(a Action) bool {
	for _, k := range actions {
		if a == k {
			return true
		}
	}
	return false
}
