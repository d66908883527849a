package wialon

import (
	"net/http"
	"strconv"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Wialon error numbers with a meaning here (upstream-facts.md, "Error
// codes").
const (
	errInvalidSession  = 1
	errInvalidService  = 2
	errInvalidInput    = 4
	errRequestFailed   = 5
	errUnknown         = 6
	errAccessDenied    = 7
	errBadCredentials  = 8
	errAuthUnavailable = 9
	errTooManyRequests = 10
	errBilling         = 14
	errNoMessages      = 1001
	errItemExists      = 1002
	errConcurrentLimit = 1003
	errTooManyMessages = 1004
	errTooLong         = 1005
	errSessionExpired  = 1011
	errTwoFactor       = 1006
)

// Waits suggested to callers where Wialon gives no hint.
const (
	// retryLimited spaces out retries after a concurrency refusal.
	retryLimited = time.Second
	// retryUnavailable is the wait after an unknown error (6) or a failed
	// request (5).
	retryUnavailable = 2 * time.Second
	// retryAuthServer is the wait while Wialon's authorization server is
	// unavailable (9).
	retryAuthServer = 5 * time.Second
)

// hintIPChanged is what a caller is told of a 1011 that a new login did
// not cure: Wialon binds a session to the IP address that logged in.
const hintIPChanged = "the Wialon session expired or the broker's egress IP changed; Wialon binds a session to the IP address that logged in, so the broker needs one stable egress IP per Wialon host"

// classify maps a Wialon error number to what the caller should do. The
// reason names the number (for logs); for the errors a caller must act on,
// the hint, our own words, says how.
func classify(svc string, code int, reason string) *upstream.Error {
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Code: code, Reason: reason}
	switch code {
	case errInvalidSession:
		e.Kind = upstream.KindSessionInvalid
	case errSessionExpired:
		// Wialon binds a session to the IP that opened it. After one
		// re-login a second 1011 means the broker's egress IP is not
		// stable (several NAT addresses): say so.
		e.Kind = upstream.KindSessionInvalid
		e.Hint = hintIPChanged
		e.Reason = "error 1011: " + e.Hint
	case errInvalidInput:
		e.Kind = upstream.KindInvalidInput
	case errInvalidService:
		e.Kind = upstream.KindInvalidInput
		e.Hint = "Wialon does not know this service"
		e.Reason = "error 2: " + e.Hint
	case errItemExists:
		e.Kind = upstream.KindInvalidInput
		e.Hint = "the item already exists, or the account's billing forbids it"
		e.Reason = "error 1002: " + e.Hint
	case errBilling:
		e.Kind = upstream.KindAccessDenied
		e.Hint = "the Wialon account's billing refuses this"
		e.Reason = "error 14: " + e.Hint
	case errTwoFactor:
		e.Kind = upstream.KindRateLimited
		e.Hint = "too many two-factor attempts on the Wialon account"
		e.RetryAfter = 100 * time.Second // Wialon: at most 4 invalid codes in 100 s
	case errTooManyMessages:
		e.Kind = upstream.KindInvalidInput
		e.Hint = "Wialon's limit of loaded messages was exceeded; narrow the interval"
		e.Reason = "error 1004: " + e.Hint
	case errTooLong:
		e.Kind = upstream.KindInvalidInput
		e.Hint = "the request ran past Wialon's execution time limit; narrow the interval"
		e.Reason = "error 1005: " + e.Hint
	case errAccessDenied:
		e.Kind = upstream.KindAccessDenied
	case errBadCredentials:
		// Only token/login judges the credential; elsewhere 8 is not a
		// verdict on the stored token and must not get it discarded.
		if svc == "token/login" {
			e.Kind = upstream.KindRejected
		}
	case errRequestFailed, errUnknown:
		e.Kind = upstream.KindUnavailable
		e.RetryAfter = retryUnavailable
	case errAuthUnavailable:
		e.Kind = upstream.KindUnavailable
		e.RetryAfter = retryAuthServer
		e.Hint = "Wialon's authorization server is unavailable"
		if e.Reason == "" {
			e.Reason = "error 9: " + e.Hint
		}
	case errTooManyRequests, errConcurrentLimit:
		e.Kind = upstream.KindRateLimited
		e.RetryAfter = retryLimited // Wialon gives no hint
	}
	return e
}

func statusError(svc string, resp *http.Response) *upstream.Error {
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Reason: "HTTP " + strconv.Itoa(resp.StatusCode)}
	switch {
	case resp.StatusCode >= 500:
		e.Kind = upstream.KindUnavailable
	case resp.StatusCode == http.StatusTooManyRequests:
		e.Kind = upstream.KindRateLimited
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"))
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		e.Reason += " (redirects are not followed)"
	}
	return e
}

// retryAfter is a Retry-After header of Wialon's HTTP front; 1 s without one.
func retryAfter(v string) time.Duration { return upstream.RetryAfter(v, time.Second) }

// ctxError reports the caller's cancellation or deadline. It is
// KindUnavailable (no answer was had) and wraps the context error, so
// errors.Is(err, context.DeadlineExceeded) works.
func ctxError(svc string, err error) *upstream.Error {
	return upstream.ContextError(providerName, svc, err)
}

func malformed(svc string, err error) *upstream.Error {
	return upstream.Malformed(providerName, svc, err)
}

// scrub makes provider text safe to put in an error (see upstream.Scrub).
func scrub(s string, secrets []string) string { return upstream.Scrub(s, secrets) }
