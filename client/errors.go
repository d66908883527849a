package client

import (
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
)

// Stable ErrorInfo reasons a caller acts on (docs/gateway.md lists them all).
const (
	// ReasonSessionInvalid: the handle is malformed, expired or revoked, or
	// its credential was deleted or replaced. Issue a new handle.
	ReasonSessionInvalid = apierr.ReasonSessionInvalid
	// ReasonCredentialRejected: the provider rejected the stored secret;
	// the customer must replace it. Retrying does not help.
	ReasonCredentialRejected = apierr.ReasonCredentialRejected
	// ReasonCredentialNotFound: no such credential.
	ReasonCredentialNotFound = apierr.ReasonCredentialNotFound
	// ReasonUpstreamRateLimited: the provider's budget for this account is
	// spent; wait RetryDelay.
	ReasonUpstreamRateLimited = apierr.ReasonUpstreamRateLimited
	// ReasonUpstreamUnavailable: the provider is down or slow; wait RetryDelay.
	ReasonUpstreamUnavailable = apierr.ReasonUpstreamUnavailable
	// ReasonRateLimited: this caller's or tenant's budget at fleetbroker is
	// spent; wait RetryDelay.
	ReasonRateLimited = apierr.ReasonRateLimited
	// ReasonCredentialsUnavailable: the gateway could not reach the
	// credentials service to resolve the handle; wait RetryDelay.
	ReasonCredentialsUnavailable = apierr.ReasonCredentialsUnavailable
	// ReasonTooManyStreams: the handle or its tenant already holds the most
	// WatchPositions streams allowed; close one before opening another.
	ReasonTooManyStreams = apierr.ReasonTooManyStreams
)

// Reason returns err's ErrorInfo reason, or "" if it carries none.
func Reason(err error) string { return apierr.Reason(err) }

// IsCredentialRejected reports whether the provider rejected the stored
// credential: the customer must replace it (PutCredential), and no retry or
// new handle helps until then.
func IsCredentialRejected(err error) bool {
	return Reason(err) == ReasonCredentialRejected
}

// IsSessionInvalid reports whether the handle no longer opens a session
// (expired, revoked, or its credential deleted or replaced).
func IsSessionInvalid(err error) bool {
	return status.Code(err) == codes.Unauthenticated && Reason(err) == ReasonSessionInvalid
}

// IsCredentialGone reports whether the credential does not exist (deleted,
// or never stored).
func IsCredentialGone(err error) bool {
	return status.Code(err) == codes.NotFound && Reason(err) == ReasonCredentialNotFound
}

// RetryDelay returns how long the server asked the caller to wait before
// trying again (its RetryInfo), and false when err carries no RetryInfo —
// then waiting is not expected to help.
func RetryDelay(err error) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			return info.GetRetryDelay().AsDuration(), true
		}
	}
	return 0, false
}

// IsRetryable reports whether the same call may succeed later: the server
// attached RetryInfo (UNAVAILABLE, RESOURCE_EXHAUSTED). Deadline and
// cancellation errors are the caller's own and are not retryable here.
func IsRetryable(err error) bool {
	_, ok := RetryDelay(err)
	return ok
}
