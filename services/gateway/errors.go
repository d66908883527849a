package gateway

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/ratelimit"
)

var (
	errInvalidHandle = apierr.New(codes.Unauthenticated, apierr.ReasonSessionInvalid, "session handle is invalid, expired or revoked", nil)
	errNoHandle      = apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "missing session handle: send metadata 'authorization: Bearer <handle>'", nil)
)

// toStatus maps an error from below to the status a caller can act on. It is
// the gateway's one mapping; errors reaching it never hold secrets.
func (s *Service) toStatus(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	var st interface{ GRPCStatus() *status.Status }
	if errors.As(err, &st) {
		// Already a status, from the credentials service or built here:
		// passed on as it was made, without the text of any wrapping.
		return st.GRPCStatus().Err()
	}
	var limited *ratelimit.LimitedError
	var ue *upstream.Error
	var field *provider.FieldError
	switch {
	case errors.As(err, &field):
		return apierr.Field(field.Field, field.Description)
	case errors.Is(err, provider.ErrWrongProvider):
		return errWrongProvider
	case errors.As(err, &limited):
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, "provider rate limit for this account reached; retry later", limited.RetryAfter)
	case errors.Is(err, context.DeadlineExceeded):
		return apierr.New(codes.DeadlineExceeded, apierr.ReasonUpstreamUnavailable, op+": deadline exceeded", nil)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, op+": canceled")
	case errors.As(err, &ue):
		return upstreamStatus(op, ue)
	case errors.Is(err, transit.ErrUnavailable):
		s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonVaultUnavailable, "encryption service unavailable", time.Second)
	case errors.Is(err, transit.ErrKeyMissing), errors.Is(err, transit.ErrDecrypt):
		// The token cache's data key: its transit key is missing, or the
		// wrapped data key no longer unwraps and was replaced too recently
		// to replace it again (tokencache).
		s.cfg.Logger.ErrorContext(ctx, op+" failed: the gateway's transit key is missing or changed; restore it (docs/reliability.md)", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonEncryptionKeyUnusable, "the session cache's encryption key is unusable; an operator must restore it", 30*time.Second)
	case isRedisUnavailable(err):
		s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonStoreUnavailable, "session cache unavailable", time.Second)
	}
	s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
	return apierr.New(codes.Internal, apierr.ReasonInternal, op+": internal error", nil)
}

// upstreamStatus maps a provider failure (BRIEF: errors callers can act on).
func upstreamStatus(op string, ue *upstream.Error) error {
	meta := map[string]string{"provider": ue.Provider}
	msg := op + ": " + ue.Provider + " " + ue.Kind.String()
	if ue.Reason != "" {
		msg += ": " + ue.Reason
	}
	switch ue.Kind {
	case upstream.KindRejected:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			ue.Provider+" rejected the stored credential; the customer must replace it", meta)
	case upstream.KindRateLimited:
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, msg, ue.RetryAfter)
	case upstream.KindUnavailable, upstream.KindSessionInvalid:
		return apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable, msg, ue.RetryAfter)
	case upstream.KindInvalidInput:
		return apierr.New(codes.InvalidArgument, apierr.ReasonUpstreamRefused, msg, meta)
	case upstream.KindAccessDenied:
		return apierr.New(codes.PermissionDenied, apierr.ReasonUpstreamAccessDenied, msg, meta)
	case upstream.KindNotFound:
		return apierr.New(codes.NotFound, apierr.ReasonUpstreamRefused, msg, meta)
	case upstream.KindNotAllowed:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed,
			"the credential's upstream address is not allowed (allow-list or an internal address)", meta)
	}
	return apierr.New(codes.Unavailable, apierr.ReasonUpstreamRefused, msg, meta)
}

// isRedisUnavailable reports a network failure talking to Redis (the token
// cache and the rate limiter), which waiting may fix.
func isRedisUnavailable(err error) bool {
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, redis.ErrClosed) || errors.Is(err, redis.ErrPoolTimeout)
}
