// Package apierr builds the gRPC statuses fleetbroker returns: a code, a
// message a caller can act on, and google.rpc details (ErrorInfo with a
// stable reason, BadRequest naming the field, RetryInfo where waiting helps).
// Statuses are made once, at the service edge; messages never hold secrets.
package apierr

import (
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Domain is the ErrorInfo domain of every fleetbroker error.
const Domain = "fleetbroker.io"

// Stable ErrorInfo reasons. Callers may switch on them; never rename one.
const (
	ReasonInvalidArgument      = "INVALID_ARGUMENT"
	ReasonUpstreamNotAllowed   = "UPSTREAM_NOT_ALLOWED"
	ReasonCredentialNotFound   = "CREDENTIAL_NOT_FOUND"
	ReasonCredentialRejected   = "CREDENTIAL_REJECTED"
	ReasonSessionInvalid       = "SESSION_INVALID"
	ReasonSessionNotFound      = "SESSION_NOT_FOUND"
	ReasonScopeMissing         = "SCOPE_MISSING"
	ReasonUpstreamUnavailable  = "UPSTREAM_UNAVAILABLE"
	ReasonUpstreamRateLimited  = "UPSTREAM_RATE_LIMITED"
	ReasonUpstreamRefused      = "UPSTREAM_REFUSED"
	ReasonVaultUnavailable     = "VAULT_UNAVAILABLE"
	ReasonStoreUnavailable     = "STORE_UNAVAILABLE"
	ReasonInternal             = "INTERNAL"
	ReasonConcurrentUpdate     = "CONCURRENT_UPDATE"
	ReasonPermissionDenied     = "PERMISSION_DENIED"
	ReasonUnauthenticated      = "UNAUTHENTICATED"
	ReasonUpstreamAccessDenied = "UPSTREAM_ACCESS_DENIED"
	ReasonRateLimited          = "RATE_LIMITED"
	// ReasonAuditUnavailable: the call was refused because its audit record
	// could not be made durable (the audit trail fails closed).
	ReasonAuditUnavailable = "AUDIT_UNAVAILABLE"
	// ReasonMethodNotAuthorized: the method has no authorization rule, so
	// nobody may call it (deny by default).
	ReasonMethodNotAuthorized = "METHOD_NOT_AUTHORIZED"
	// ReasonEncryptionKeyUnusable: Vault is up but the service's transit
	// key is missing (or no longer opens what it wrapped); an operator must
	// restore it (docs/reliability.md). UNAVAILABLE with RetryInfo.
	ReasonEncryptionKeyUnusable = "ENCRYPTION_KEY_UNUSABLE"
	// ReasonCredentialUndecryptable: the stored secret no longer decrypts
	// (its transit key was lost or replaced, or the record was tampered
	// with); restore the key, or put the credential again.
	// FAILED_PRECONDITION.
	ReasonCredentialUndecryptable = "CREDENTIAL_UNDECRYPTABLE"
	// ReasonCredentialChanged: the credential was replaced between two
	// steps of one call (ABORTED); retrying resolves it afresh.
	ReasonCredentialChanged = "CREDENTIAL_CHANGED"
	// ReasonRetired: the RPC is retired (UNIMPLEMENTED); its documentation
	// names the replacement.
	ReasonRetired = "RETIRED"
	// ReasonCredentialsUnavailable: the gateway could not reach the
	// credentials service (to resolve a handle or mint an upstream
	// session). UNAVAILABLE with RetryInfo.
	ReasonCredentialsUnavailable = "CREDENTIALS_SERVICE_UNAVAILABLE"
	// ReasonTooManyStreams: the session handle or its tenant already holds
	// as many open streams on this gateway replica as it may
	// (RESOURCE_EXHAUSTED); close one first.
	ReasonTooManyStreams = "TOO_MANY_STREAMS"
)

// New returns a status error with an ErrorInfo detail carrying reason and
// metadata (metadata values must be safe to log).
func New(code codes.Code, reason, msg string, metadata map[string]string) error {
	return with(status.New(code, msg), &errdetails.ErrorInfo{Reason: reason, Domain: Domain, Metadata: metadata})
}

// Field returns INVALID_ARGUMENT naming field (a dotted path) in a
// BadRequest detail.
func Field(field, description string) error {
	return FieldViolations(description, []*errdetails.BadRequest_FieldViolation{{Field: field, Description: description}})
}

// FieldViolations returns INVALID_ARGUMENT with one BadRequest detail
// listing every violation, and msg as the status message.
func FieldViolations(msg string, violations []*errdetails.BadRequest_FieldViolation) error {
	return with(status.New(codes.InvalidArgument, msg),
		&errdetails.BadRequest{FieldViolations: violations},
		&errdetails.ErrorInfo{Reason: ReasonInvalidArgument, Domain: Domain})
}

// Retryable returns a status error with ErrorInfo and a RetryInfo telling the
// caller how long to wait.
func Retryable(code codes.Code, reason, msg string, after time.Duration) error {
	if after <= 0 {
		after = time.Second
	}
	return with(status.New(code, msg),
		&errdetails.ErrorInfo{Reason: reason, Domain: Domain},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(after)})
}

func with(st *status.Status, details ...protoadapt.MessageV1) error {
	withDetails, err := st.WithDetails(details...)
	if err != nil {
		return st.Err()
	}
	return withDetails.Err()
}

// Reason returns the ErrorInfo reason of err, or "" if it has none.
func Reason(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return ""
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}
