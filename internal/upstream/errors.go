// Package upstream holds what the provider clients (Wialon, FleetUp) share:
// the classification of upstream failures that callers act on, and the
// allow-list that decides which upstream hosts the broker may call.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Kind classifies an upstream failure by what the caller should do about it.
type Kind int

const (
	// KindInternal is anything not classified below.
	KindInternal Kind = iota
	// KindRejected: the provider rejected the stored credential (Wialon
	// error 8, FleetUp 401 on /token). The customer must replace it.
	KindRejected
	// KindSessionInvalid: the upstream session or JWT is no longer valid
	// (Wialon error 1 or 1011, FleetUp 401 on a call). Log in again, once.
	KindSessionInvalid
	// KindRateLimited: slow down (Wialon 10/1003, FleetUp 429).
	KindRateLimited
	// KindUnavailable: the provider is down or answered 5xx, or the network failed.
	KindUnavailable
	// KindInvalidInput: the provider refused the request's input (Wialon 4, FleetUp 422).
	KindInvalidInput
	// KindAccessDenied: the credential lacks the right (Wialon 7, FleetUp 403).
	KindAccessDenied
	// KindNotFound: no such item (FleetUp 404).
	KindNotFound
	// KindNotAllowed: the upstream address is not allowed (allow-list or an
	// internal address at dial time). Retrying cannot help.
	KindNotAllowed
)

func (k Kind) String() string {
	switch k {
	case KindRejected:
		return "rejected"
	case KindSessionInvalid:
		return "session_invalid"
	case KindRateLimited:
		return "rate_limited"
	case KindUnavailable:
		return "unavailable"
	case KindInvalidInput:
		return "invalid_input"
	case KindAccessDenied:
		return "access_denied"
	case KindNotFound:
		return "not_found"
	case KindNotAllowed:
		return "not_allowed"
	default:
		return "internal"
	}
}

// Error is an upstream failure. Its text never holds a secret, token, sid or JWT.
type Error struct {
	Kind     Kind
	Provider string // "wialon" or "fleetup"
	Op       string // e.g. "token/login", "POST /token"
	// Code is the provider's error number (Wialon) or HTTP status (FleetUp).
	Code int
	// Reason is the provider's own short explanation, if any.
	Reason string
	// Hint says what the caller can do about the failure, in the broker's
	// own words: a constant of the provider package, never the provider's
	// text or anything the request carried. The gateway adds it to the
	// message callers get; Reason stays in the logs.
	Hint string
	// RetryAfter is how long to wait before retrying, when known.
	RetryAfter time.Duration
	// Err is the underlying transport error, if any.
	Err error
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("%s %s: %s", e.Provider, e.Op, e.Kind)
	if e.Code != 0 {
		msg += fmt.Sprintf(" (code %d)", e.Code)
	}
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the Kind of err, or KindInternal if err is not an *Error.
func KindOf(err error) Kind {
	var ue *Error
	if errors.As(err, &ue) {
		return ue.Kind
	}
	return KindInternal
}

// TransportError classifies a failure to get any HTTP answer: the caller's
// own cancellation or deadline (wrapped, so errors.Is works), a refused
// upstream address (KindNotAllowed), or else KindUnavailable.
func TransportError(ctx context.Context, provider, op string, err error) *Error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return &Error{Kind: KindUnavailable, Provider: provider, Op: op, Err: ctxErr}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // the URL adds nothing the caller does not know
	}
	if errors.Is(err, ErrNotAllowed) {
		return &Error{Kind: KindNotAllowed, Provider: provider, Op: op, Err: err}
	}
	return &Error{Kind: KindUnavailable, Provider: provider, Op: op, Err: err}
}

// ContextError reports the caller's cancellation or deadline: KindUnavailable
// (no answer was had) wrapping the context error, so errors.Is(err,
// context.DeadlineExceeded) works.
func ContextError(provider, op string, err error) *Error {
	return &Error{Kind: KindUnavailable, Provider: provider, Op: op, Err: err}
}

// Malformed reports a reply that could not be decoded.
func Malformed(provider, op string, err error) *Error {
	return &Error{Kind: KindInternal, Provider: provider, Op: op, Reason: "malformed reply", Err: err}
}

// RetryAfter reads a Retry-After header — whole seconds or an HTTP date —
// capped at an hour; a missing, invalid or past value is fallback.
func RetryAfter(v string, fallback time.Duration) time.Duration {
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs > 0 {
		return time.Duration(min(secs, 3600)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return min(d, time.Hour)
		}
	}
	return fallback
}
