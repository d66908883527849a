package fleetup

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"time"
)

// maxJWT bounds the input JWTExpiry will look at; FleetUp's are ~400 bytes.
const maxJWT = 16 << 10

// JWTExpiry returns the expiry (the "exp" claim) of a JWS-compact JWT
// WITHOUT verifying its signature. That is enough for its one use here —
// deciding when to mint again — because the JWT comes straight from FleetUp
// over TLS and FleetUp verifies it on every call; a wrong exp costs at most
// one 401 and one re-mint. Never use it to trust a JWT's claims.
//
// Errors describe what is wrong and never include the token.
func JWTExpiry(jwt string) (time.Time, error) {
	if len(jwt) > maxJWT {
		return time.Time{}, errors.New("fleetup: JWT is implausibly long")
	}
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return time.Time{}, errors.New("fleetup: JWT does not have three parts")
	}
	// base64url without padding per RFC 7515; tolerate padding anyway.
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return time.Time{}, errors.New("fleetup: JWT payload is not base64url")
	}
	// A float64 holds any plausible exp exactly, and json refuses to put a
	// string into it: RFC 7519 NumericDate is a JSON number.
	var claims struct {
		Exp *float64 `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return time.Time{}, errors.New("fleetup: JWT payload is not a JSON object with a numeric exp")
	}
	if claims.Exp == nil {
		return time.Time{}, errors.New("fleetup: JWT has no exp claim")
	}
	// exp is seconds, possibly fractional. The upper bound keeps the
	// conversion to int64 exact and the result sane.
	f := *claims.Exp
	if math.IsNaN(f) || f < 1 || f >= 253402300800 { // [1970-01-01T00:00:01, 10000-01-01)
		return time.Time{}, errors.New("fleetup: JWT exp is out of range")
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), nil
}
