package credentials

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// keyMissingRetry is the RetryInfo of ENCRYPTION_KEY_UNUSABLE: restoring a
// key takes an operator, so asking again every second would only add load.
const keyMissingRetry = 30 * time.Second

// toStatus maps an internal error to the gRPC status a caller can act on.
// It is the one place where the service's errors become statuses. Errors
// that reach here never hold secrets (every layer below promises that); the
// detailed error is logged, the caller gets a stable reason.
func (s *Service) toStatus(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	// The caller's deadline or cancellation, not a dependency's own bound
	// (a Redis call cut off at --redis-timeout is unavailability).
	callerDone := ctx.Err() != nil
	switch {
	case callerDone && errors.Is(err, context.DeadlineExceeded):
		return apierr.New(codes.DeadlineExceeded, apierr.ReasonInternal, op+": deadline exceeded", nil)
	case callerDone && errors.Is(err, context.Canceled):
		return apierr.New(codes.Canceled, apierr.ReasonInternal, op+": canceled", nil)
	case errors.Is(err, store.ErrNotFound):
		return apierr.New(codes.NotFound, apierr.ReasonCredentialNotFound, "credential not found", nil)
	case errors.Is(err, store.ErrVersionConflict):
		return apierr.New(codes.Aborted, apierr.ReasonConcurrentUpdate, "credential changed concurrently; retry", nil)
	case errors.Is(err, store.ErrUnavailable):
		s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonStoreUnavailable, "credential store unavailable", 0)
	case errors.Is(err, transit.ErrUnavailable):
		s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonVaultUnavailable, "encryption service unavailable", 0)
	case errors.Is(err, transit.ErrKeyMissing):
		s.cfg.Logger.ErrorContext(ctx, op+" failed: the transit key is missing from Vault; restore it (docs/reliability.md)", "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonEncryptionKeyUnusable,
			"the encryption key is missing from Vault; an operator must restore it", keyMissingRetry)
	case errors.Is(err, transit.ErrDecrypt):
		s.cfg.Logger.ErrorContext(ctx, op+" failed: a stored secret does not decrypt (transit key lost or replaced, or the record was altered)", "error", err)
		return apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialUndecryptable,
			"the stored secret no longer decrypts (its encryption key was lost or replaced): restore the key, or put the credential again", nil)
	case errors.Is(err, transit.ErrInvalid):
		s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
		return apierr.New(codes.Internal, apierr.ReasonInternal, op+": encryption error", nil)
	}
	var ue *upstream.Error
	if errors.As(err, &ue) {
		return upstreamStatus(ue)
	}
	s.cfg.Logger.ErrorContext(ctx, op+" failed", "error", err)
	return apierr.New(codes.Internal, apierr.ReasonInternal, op+": internal error", nil)
}

// upstreamStatus maps a provider's answer during validation.
func upstreamStatus(ue *upstream.Error) error {
	meta := map[string]string{"provider": ue.Provider}
	switch ue.Kind {
	case upstream.KindRejected, upstream.KindAccessDenied:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			ue.Provider+" rejected the credential: "+reasonOr(ue, "bad credentials")+"; nothing was stored", meta)
	case upstream.KindNotAllowed:
		return apierr.New(codes.InvalidArgument, apierr.ReasonUpstreamNotAllowed,
			"the base URL's host resolves to an address that is not allowed (loopback, private or link-local); nothing was stored", meta)
	case upstream.KindRateLimited:
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, ue.Provider+" rate limit reached; retry later", ue.RetryAfter)
	case upstream.KindUnavailable:
		return apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable, ue.Provider+" is unavailable; nothing was stored", ue.RetryAfter)
	default:
		return apierr.New(codes.Unavailable, apierr.ReasonUpstreamRefused, ue.Provider+" answered unexpectedly ("+ue.Kind.String()+"); nothing was stored", meta)
	}
}

func reasonOr(ue *upstream.Error, def string) string {
	if ue.Reason != "" {
		return ue.Reason
	}
	return def
}

// logAttrsSession are the attributes safe to log about a session.
func logAttrsSession(sessionID, tenantID, credentialID string) []any {
	return []any{slog.String("session_id", sessionID), slog.String("tenant_id", tenantID), slog.String("credential_id", credentialID)}
}
