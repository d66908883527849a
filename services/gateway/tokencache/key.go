package tokencache

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// ErrInvalidKey means a Key that cannot be turned into a Redis key name
// safely: an empty field, or one containing ':', '{' or '}'.
var ErrInvalidKey = errors.New("tokencache: invalid key")

// Key names one cached upstream token, bound to the exact secret and
// upstream it was minted from: a token is found only under the generation
// and base URL of its credential, so a rotated, deleted or re-created
// credential (whose version may start at 1 again) never reuses a token of
// another secret, and a token is never sent to another upstream.
type Key struct {
	Tenant     string
	Credential string
	// Generation identifies the credential's secret (ResolveSession's
	// credential_generation): it changes on every put and never repeats.
	Generation string
	// BaseURL is the upstream the token belongs to. Only its SHA-256 is
	// part of the Redis key name (and so of the value's associated data).
	BaseURL string
	// Kind is the provider's token kind (provider.Provider's TokenKind:
	// wialon.TokenKind, fleetup.TokenKind); the cache knows no provider.
	Kind string
}

func (k Key) validate() error {
	for _, f := range []struct{ name, value string }{
		{"tenant", k.Tenant}, {"credential", k.Credential}, {"generation", k.Generation}, {"kind", k.Kind},
	} {
		if f.value == "" {
			return fmt.Errorf("%w: empty %s", ErrInvalidKey, f.name)
		}
		// The separators and braces would make two different keys share a
		// name, or move the Cluster hash tag away from the tenant.
		if strings.ContainsAny(f.value, ":{}") {
			return fmt.Errorf("%w: %s %q contains ':', '{' or '}'", ErrInvalidKey, f.name, f.value)
		}
	}
	if k.BaseURL == "" {
		return fmt.Errorf("%w: empty base URL", ErrInvalidKey)
	}
	return nil
}

// upstreamID names a base URL in a key: 128 bits of its SHA-256.
func upstreamID(baseURL string) string {
	sum := sha256.Sum256([]byte(baseURL))
	return hex.EncodeToString(sum[:16])
}

// names are the Redis key names that belong to one Key.
type names struct {
	token   string // the encrypted token
	lock    string // the mint lock
	dataKey string // the tenant's wrapped data key
}

func (c *Cache) names(k Key) names {
	tenant := c.prefix + ":{" + k.Tenant + "}"
	token := tenant + ":tok:" + k.Credential + ":" + k.Generation + ":" + upstreamID(k.BaseURL) + ":" + k.Kind
	return names{token: token, lock: token + ":lock", dataKey: tenantDataKeyName(c.prefix, k.Tenant)}
}

func tenantDataKeyName(prefix, tenant string) string {
	return prefix + ":{" + tenant + "}:dk"
}
