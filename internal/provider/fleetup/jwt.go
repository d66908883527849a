package fleetup

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"time"
)

// maxJWT bounds the input the JWT readers will look at; FleetUp's are ~400 bytes.
const maxJWT = 16 << 10

// claims is what fleetbroker reads from a FleetUp JWT, WITHOUT verifying its
// signature. That is enough for its uses here — when to mint again, how old
// a token is, which account FleetUp issued it for — because the JWT comes
// straight from FleetUp over TLS (through the credentials service) and
// FleetUp verifies it on every call; a wrong claim costs at most one 401
// and one re-mint. Never use it to trust a JWT's claims for anything else.
type claims struct {
	Exp time.Time
	// Iat is zero when the token does not say.
	Iat time.Time
	// AccountID is sessionInfo.accountId, as in FleetUp's documented
	// example token; 0 when the token does not say.
	AccountID int64
}

// parseClaims reads a JWS-compact JWT's payload. Errors describe what is
// wrong and never include the token.
func parseClaims(jwt string) (claims, error) {
	if len(jwt) > maxJWT {
		return claims{}, errors.New("fleetup: JWT is implausibly long")
	}
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return claims{}, errors.New("fleetup: JWT does not have three parts")
	}
	// base64url without padding per RFC 7515; tolerate padding anyway.
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return claims{}, errors.New("fleetup: JWT payload is not base64url")
	}
	// A float64 holds any plausible date exactly, and json refuses to put a
	// string into it: RFC 7519 NumericDate is a JSON number.
	var raw struct {
		Exp *float64 `json:"exp"`
		// Iat and SessionInfo are read leniently below: a token whose
		// other claims are odd still has a usable exp.
		Iat         json.RawMessage `json:"iat"`
		SessionInfo json.RawMessage `json:"sessionInfo"`
	}
	if err := json.Unmarshal(payload, &raw); err != nil {
		return claims{}, errors.New("fleetup: JWT payload is not a JSON object with a numeric exp")
	}
	if raw.Exp == nil {
		return claims{}, errors.New("fleetup: JWT has no exp claim")
	}
	var c claims
	var ok bool
	if c.Exp, ok = numericDate(*raw.Exp); !ok {
		return claims{}, errors.New("fleetup: JWT exp is out of range")
	}
	var iat float64
	if json.Unmarshal(raw.Iat, &iat) == nil {
		c.Iat, _ = numericDate(iat) // an unreadable iat is as good as none
	}
	var info struct {
		AccountID int64 `json:"accountId"`
	}
	if json.Unmarshal(raw.SessionInfo, &info) == nil && info.AccountID > 0 {
		c.AccountID = info.AccountID
	}
	return c, nil
}

// numericDate converts seconds, possibly fractional. The bounds keep the
// conversion to int64 exact and the result sane.
func numericDate(f float64) (time.Time, bool) {
	if math.IsNaN(f) || f < 1 || f >= 253402300800 { // [1970-01-01T00:00:01, 10000-01-01)
		return time.Time{}, false
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), true
}

// JWTExpiry returns the expiry (the "exp" claim) of a JWS-compact JWT
// without verifying its signature (see claims). Errors describe what is
// wrong and never include the token.
func JWTExpiry(jwt string) (time.Time, error) {
	c, err := parseClaims(jwt)
	return c.Exp, err
}

// issuedAt is when FleetUp minted jwt: its iat claim, else its exp minus
// the documented lifetime. ok is false when the token says neither.
func issuedAt(jwt string) (time.Time, bool) {
	c, err := parseClaims(jwt)
	switch {
	case err != nil:
		return time.Time{}, false
	case !c.Iat.IsZero():
		return c.Iat, true
	default:
		return c.Exp.Add(-DefaultJWTLifetime), true
	}
}
