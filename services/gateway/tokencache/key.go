package tokencache

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Token kinds the gateway caches.
const (
	KindWialonEID  = "wialon-eid"
	KindFleetUpJWT = "fleetup-jwt"
)

// ErrInvalidKey means a Key that cannot be turned into a Redis key name
// safely: an empty field, or one containing ':', '{' or '}'.
var ErrInvalidKey = errors.New("tokencache: invalid key")

// Key names one cached upstream token.
type Key struct {
	Tenant     string
	Credential string
	// Version is the credential's version: a rotated secret gets a new
	// version and so never reuses a token minted from the old secret.
	Version int64
	// Kind is KindWialonEID, KindFleetUpJWT or another short name.
	Kind string
}

func (k Key) validate() error {
	for _, f := range []struct{ name, value string }{
		{"tenant", k.Tenant}, {"credential", k.Credential}, {"kind", k.Kind},
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
	return nil
}

// names are the Redis key names that belong to one Key.
type names struct {
	token   string // the encrypted token
	lock    string // the mint lock
	dataKey string // the tenant's wrapped data key
}

func (c *Cache) names(k Key) names {
	tenant := c.prefix + ":{" + k.Tenant + "}"
	token := tenant + ":tok:" + k.Credential + ":" + strconv.FormatInt(k.Version, 10) + ":" + k.Kind
	return names{token: token, lock: token + ":lock", dataKey: tenantDataKeyName(c.prefix, k.Tenant)}
}

func tenantDataKeyName(prefix, tenant string) string {
	return prefix + ":{" + tenant + "}:dk"
}
