package gateway

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

var (
	errInvalidHandle = apierr.New(codes.Unauthenticated, apierr.ReasonSessionInvalid, "session handle is invalid, expired or revoked", nil)
	errNoHandle      = apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "missing session handle: send metadata 'authorization: Bearer <handle>'", nil)
	errInternal      = apierr.New(codes.Internal, apierr.ReasonInternal, "internal error; the gateway's log has the cause under this call's request id (x-request-id)", nil)
)

// toStatus maps an error from below to the status a caller can act on, and
// logs the cause with the call's request id. It is the gateway's one
// mapping. Callers get a code, a stable ErrorInfo reason, RetryInfo where
// waiting helps and a message written here — never the text of an error
// chain, of the credentials service's statuses or of the provider's answer.
func (s *Service) toStatus(ctx context.Context, op string, err error) error {
	st, level := s.classify(ctx, op, err)
	if level != nil {
		s.logCause(ctx, *level, op, err)
	}
	return st
}

// mapStatus is toStatus without the log line: for an error already logged
// once and handed to many callers (a failed watch poll).
func (s *Service) mapStatus(ctx context.Context, op string, err error) error {
	st, _ := s.classify(ctx, op, err)
	return st
}

// logCause logs why a call failed. Errors reaching here never hold secrets
// (provider text is scrubbed where it is read, upstream.Scrub).
func (s *Service) logCause(ctx context.Context, level slog.Level, op string, err error) {
	s.cfg.Logger.Log(ctx, level, op+" failed", "request_id", requestid.FromContext(ctx), "error", err.Error())
}

var (
	levelInfo  = ptr(slog.LevelInfo)
	levelWarn  = ptr(slog.LevelWarn)
	levelError = ptr(slog.LevelError)
)

func ptr[T any](v T) *T { return &v }

// classify returns the status for err and the level to log its cause at
// (nil: the status says it all).
func (s *Service) classify(ctx context.Context, op string, err error) (error, *slog.Level) {
	if err == nil {
		return nil, nil
	}
	// The caller's own deadline or cancellation: it is gone, or about to be.
	// A deadline of the gateway's own (an upstream budget, shorter than the
	// caller's) is the upstream's slowness, below.
	if ctx.Err() != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return apierr.New(codes.DeadlineExceeded, apierr.ReasonUpstreamUnavailable, op+": deadline exceeded", nil), levelInfo
		}
		return status.Error(codes.Canceled, op+": canceled"), nil
	}
	var remote *credentialsError
	if errors.As(err, &remote) {
		return credentialsStatus(op, remote.err)
	}
	var limited *ratelimit.LimitedError
	var ue *upstream.Error
	var field *provider.FieldError
	switch {
	case errors.As(err, &field):
		return apierr.Field(field.Field, field.Description), nil
	case errors.Is(err, provider.ErrWrongProvider):
		return errWrongProvider, nil
	case errors.As(err, &limited):
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, "the provider's request budget for this account is spent; retry after the RetryInfo delay", limited.RetryAfter), nil
	case errors.As(err, &ue):
		return upstreamStatus(ue), upstreamLevel(ue.Kind)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, op+": canceled"), nil
	case errors.Is(err, context.DeadlineExceeded):
		// The gateway's upstream budget ran out before the caller's
		// deadline (shared reads, withUpstream's waits): the upstream, or
		// its login, is too slow.
		return errUpstreamTooSlow, levelWarn
	case errors.Is(err, transit.ErrUnavailable):
		return apierr.Retryable(codes.Unavailable, apierr.ReasonVaultUnavailable, "encryption service unavailable; retry after the RetryInfo delay", time.Second), levelError
	case errors.Is(err, transit.ErrKeyMissing), errors.Is(err, transit.ErrDecrypt):
		// The token cache's data key: its transit key is missing, or the
		// wrapped data key no longer unwraps and was replaced too recently
		// to replace it again (tokencache).
		s.cfg.Logger.ErrorContext(ctx, op+" failed: the gateway's transit key is missing or changed; restore it (docs/reliability.md)",
			"request_id", requestid.FromContext(ctx), "error", err.Error())
		return apierr.Retryable(codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, "the session cache's encryption key is unusable; an operator must restore it", 30*time.Second), nil
	case isRedisUnavailable(err):
		return apierr.Retryable(codes.Unavailable, apierr.ReasonStoreUnavailable, "session cache unavailable; retry after the RetryInfo delay", time.Second), levelError
	}
	if local, ok := localStatus(err); ok {
		// Built here (apierr), for this caller: passed on as it was made,
		// without the text of any wrapping.
		return local, nil
	}
	return errInternal, levelError
}

// localStatus returns err's status if the gateway made it itself: a status
// with a fleetbroker ErrorInfo that did not come from the credentials
// service (those are wrapped in credentialsError by remoteSessions).
func localStatus(err error) (error, bool) {
	var withStatus interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &withStatus) {
		return nil, false
	}
	st := withStatus.GRPCStatus()
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == apierr.Domain {
			return st.Err(), true
		}
	}
	return nil, false
}

var errUpstreamTooSlow = apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable,
	"the provider did not answer within the call's deadline; retry after the RetryInfo delay", time.Second)

// upstreamStatus maps a provider failure (BRIEF: errors callers can act
// on). The provider's own text stays in the log; the provider package's
// hint (upstream.Error.Hint, a constant of ours) is added.
func upstreamStatus(ue *upstream.Error) error {
	meta := map[string]string{"provider": ue.Provider}
	hinted := func(msg string) string {
		if ue.Hint == "" {
			return msg
		}
		return msg + " (" + ue.Hint + ")"
	}
	switch ue.Kind {
	case upstream.KindRejected:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			"the provider rejected the stored credential; the customer must replace it", meta)
	case upstream.KindRateLimited:
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited,
			hinted("the provider's rate limit for this account is reached; retry after the RetryInfo delay"), ue.RetryAfter)
	case upstream.KindUnavailable, upstream.KindSessionInvalid:
		return apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable,
			hinted("the provider is unavailable; retry after the RetryInfo delay"), ue.RetryAfter)
	case upstream.KindInvalidInput:
		return apierr.New(codes.InvalidArgument, apierr.ReasonUpstreamRefused, hinted("the provider refused the request's input"), meta)
	case upstream.KindAccessDenied:
		return apierr.New(codes.PermissionDenied, apierr.ReasonUpstreamAccessDenied, hinted("the credential lacks the provider's permission for this request"), meta)
	case upstream.KindNotFound:
		return apierr.New(codes.NotFound, apierr.ReasonUpstreamRefused, "the provider found no such item", meta)
	case upstream.KindNotAllowed:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed,
			"the credential's upstream address is not allowed (allow-list or an internal address)", meta)
	}
	return apierr.New(codes.Unavailable, apierr.ReasonUpstreamRefused, hinted("the provider answered in a way the gateway does not understand"), meta)
}

// upstreamLevel is how loudly a provider failure is logged: failures of the
// provider itself are warnings, answers about the request are information.
func upstreamLevel(k upstream.Kind) *slog.Level {
	switch k {
	case upstream.KindUnavailable, upstream.KindSessionInvalid, upstream.KindInternal, upstream.KindNotAllowed, upstream.KindRejected:
		return levelWarn
	}
	return levelInfo
}

// credentialsError is a failed call to the credentials service. Its status
// was made for the gateway — it may name the gateway's principal, tenants,
// the service's address or its own error chain — so it is never passed to
// the gateway's callers as it is (credentialsStatus).
type credentialsError struct {
	method string
	err    error
}

func (e *credentialsError) Error() string {
	return "credentials service " + e.method + ": " + e.err.Error()
}
func (e *credentialsError) Unwrap() error { return e.err }

// relayed are the credentials service's reasons a gateway caller can act
// on, each with the message the caller gets instead of the service's own.
var relayed = map[string]string{
	apierr.ReasonCredentialRejected:      "the provider rejected the stored credential; the customer must replace it",
	apierr.ReasonCredentialUndecryptable: "the stored credential no longer decrypts; it must be restored or put again",
	apierr.ReasonCredentialChanged:       "the credential was replaced while the call was under way; retry",
	apierr.ReasonUpstreamNotAllowed:      "the credential's upstream address is not allowed (allow-list or an internal address)",
	apierr.ReasonUpstreamRateLimited:     "the provider's rate limit for this account is reached; retry after the RetryInfo delay",
	apierr.ReasonUpstreamUnavailable:     "the provider is unavailable; retry after the RetryInfo delay",
	apierr.ReasonVaultUnavailable:        "encryption service unavailable; retry after the RetryInfo delay",
	apierr.ReasonStoreUnavailable:        "credential store unavailable; retry after the RetryInfo delay",
	apierr.ReasonEncryptionKeyUnusable:   "the credential's encryption key is unusable; an operator must restore it",
}

var errCredentialsUnavailable = apierr.Retryable(codes.Unavailable, apierr.ReasonCredentialsUnavailable,
	"the credentials service is unavailable; retry after the RetryInfo delay", time.Second)

// credentialsStatus maps a failed call to the credentials service for the
// gateway's caller (whose own deadline has not passed): the reasons in
// relayed keep their code, reason and RetryInfo with the gateway's message;
// a refused or unknown handle is SESSION_INVALID; the service unreachable,
// overloaded or slow is CREDENTIALS_SERVICE_UNAVAILABLE; anything else is
// INTERNAL. The service's own message goes to the log.
func credentialsStatus(op string, err error) (error, *slog.Level) {
	st := status.Convert(err)
	reason := apierr.Reason(err)
	if msg, ok := relayed[reason]; ok {
		code := st.Code()
		if code == codes.DeadlineExceeded {
			code = codes.Unavailable // the service's own bound on its login, not the caller's
		}
		if delay, ok := retryDelay(st); ok || code == codes.Unavailable || code == codes.ResourceExhausted {
			return apierr.Retryable(code, reason, msg, delay), levelWarn
		}
		return apierr.New(code, reason, msg, nil), levelInfo
	}
	switch st.Code() {
	case codes.Unauthenticated, codes.NotFound:
		return errInvalidHandle, levelInfo
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted:
		if delay, ok := retryDelay(st); ok {
			return apierr.Retryable(codes.Unavailable, apierr.ReasonCredentialsUnavailable, status.Convert(errCredentialsUnavailable).Message(), delay), levelError
		}
		return errCredentialsUnavailable, levelError
	}
	// PERMISSION_DENIED (the gateway's principal lacks sessions.resolve on
	// the tenant), INVALID_ARGUMENT, UNIMPLEMENTED (a credentials service
	// too old for MintUpstreamSession): the deployment is wrong, and the
	// caller can do nothing about it.
	return errInternal, levelError
}

func retryDelay(st *status.Status) (time.Duration, bool) {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			return info.GetRetryDelay().AsDuration(), true
		}
	}
	return 0, false
}

// remoteSessions marks every error of the credentials service's client as
// the credentials service's (credentialsError), so the gateway never takes
// its statuses for its own.
type remoteSessions struct {
	credentialsv1.SessionServiceClient
}

func wrapCredentials(method string, err error) error {
	if err == nil {
		return nil
	}
	return &credentialsError{method: method, err: err}
}

func (r remoteSessions) ResolveSession(ctx context.Context, in *credentialsv1.ResolveSessionRequest, opts ...grpc.CallOption) (*credentialsv1.ResolveSessionResponse, error) {
	resp, err := r.SessionServiceClient.ResolveSession(ctx, in, opts...)
	return resp, wrapCredentials("ResolveSession", err)
}

func (r remoteSessions) MintUpstreamSession(ctx context.Context, in *credentialsv1.MintUpstreamSessionRequest, opts ...grpc.CallOption) (*credentialsv1.MintUpstreamSessionResponse, error) {
	resp, err := r.SessionServiceClient.MintUpstreamSession(ctx, in, opts...)
	return resp, wrapCredentials("MintUpstreamSession", err)
}

func (r remoteSessions) ReportRejection(ctx context.Context, in *credentialsv1.ReportRejectionRequest, opts ...grpc.CallOption) (*credentialsv1.ReportRejectionResponse, error) {
	resp, err := r.SessionServiceClient.ReportRejection(ctx, in, opts...)
	return resp, wrapCredentials("ReportRejection", err)
}

func (r remoteSessions) ListRetiredGenerations(ctx context.Context, in *credentialsv1.ListRetiredGenerationsRequest, opts ...grpc.CallOption) (*credentialsv1.ListRetiredGenerationsResponse, error) {
	resp, err := r.SessionServiceClient.ListRetiredGenerations(ctx, in, opts...)
	return resp, wrapCredentials("ListRetiredGenerations", err)
}

// isRedisUnavailable reports a network failure talking to Redis (the token
// cache and the rate limiter), which waiting may fix.
func isRedisUnavailable(err error) bool {
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, redis.ErrClosed) || errors.Is(err, redis.ErrPoolTimeout)
}
