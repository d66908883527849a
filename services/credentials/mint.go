package credentials

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

var (
	errCredentialChanged = apierr.New(codes.Aborted, apierr.ReasonCredentialChanged,
		"the credential was replaced since the handle was resolved; resolve it again", nil)
	errRejectedBefore = apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
		"the provider rejected this credential; the customer must replace it", nil)
)

// MintUpstreamSession logs in upstream with the secret behind a live handle
// and returns only the upstream session: the custody of the long-lived
// secret stays here. The handler authorizes sessions.resolve on the
// handle's tenant (in resolve), and the interceptor audits the call.
func (c *sessionServer) MintUpstreamSession(ctx context.Context, req *credentialsv1.MintUpstreamSessionRequest) (*credentialsv1.MintUpstreamSessionResponse, error) {
	s := c.s
	sess, rec, err := s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	// Mint only from exactly the secret the gateway will cache the session
	// under: a session of another generation cached there would reach the
	// callers of the wrong secret, and maybe the wrong base URL.
	if rec.Generation != req.GetCredentialGeneration() {
		return nil, errCredentialChanged
	}
	if rec.ValidationState == store.ValidationRejected {
		// Logging in again would only fail again, and count against the
		// provider's limit of failed logins.
		return nil, errRejectedBefore
	}
	if err := s.cfg.AllowList.Check(rec.BaseURL); err != nil {
		return nil, apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed,
			"the credential's base URL is not on this server's allow-list", nil)
	}
	sec, err := s.decrypt(ctx, rec)
	if err != nil {
		return nil, s.toStatus(ctx, "mint upstream session", err)
	}
	minted, err := sec.p.Login(ctx, rec.BaseURL, sec.msg)
	if err != nil {
		s.recordLoginRejection(ctx, rec, err)
		return nil, s.mintStatus(ctx, err)
	}
	s.recordUse(ctx, rec)
	session, err := anypb.New(minted.Session)
	if err != nil {
		return nil, s.toStatus(ctx, "mint upstream session", err)
	}
	resp := &credentialsv1.MintUpstreamSessionResponse{
		SessionId:            sess.SessionID,
		CredentialVersion:    rec.Version,
		CredentialGeneration: rec.Generation,
		BaseUrl:              rec.BaseURL,
		UpstreamSession:      session,
	}
	if !minted.Expires.IsZero() {
		resp.ExpireTime = timestamppb.New(minted.Expires)
	}
	s.cfg.Logger.InfoContext(ctx, "upstream session minted", append(logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID),
		"provider", rec.Provider, "version", rec.Version)...)
	return resp, nil
}

// recordLoginRejection marks the credential rejected when the provider
// refused the login (as ValidateCredential would), if it is still at the
// version that was tried, and announces it (a REJECTED event).
func (s *Service) recordLoginRejection(ctx context.Context, rec store.Credential, err error) {
	var ue *upstream.Error
	if !errors.As(err, &ue) || (ue.Kind != upstream.KindRejected && ue.Kind != upstream.KindAccessDenied) {
		return
	}
	v := store.Validation{State: store.ValidationRejected, Message: ue.Provider + " rejected the credential: " + reasonOr(ue, "bad credentials"),
		UpstreamUser: rec.UpstreamUser, Time: s.cfg.Now()}
	_, serr := s.cfg.Store.SetValidation(ctx, rec.TenantID, rec.CredentialID, rec.Version, v)
	if serr != nil && !errors.Is(serr, store.ErrVersionConflict) {
		s.cfg.Logger.WarnContext(ctx, "could not record the provider's rejection", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "error", serr)
		return
	}
	if serr == nil {
		s.emitRejected(ctx, rec, v.Message)
	}
	s.cfg.Logger.WarnContext(ctx, "credential rejected upstream at login", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID,
		"version", rec.Version, "provider", ue.Provider)
}

// mintStatus maps a failed upstream login for the gateway, which passes
// the status on to its caller.
func (s *Service) mintStatus(ctx context.Context, err error) error {
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		return s.toStatus(ctx, "mint upstream session", err)
	}
	meta := map[string]string{"provider": ue.Provider}
	msg := ue.Provider + " login: " + ue.Kind.String()
	if ue.Reason != "" {
		msg += ": " + ue.Reason
	}
	switch ue.Kind {
	case upstream.KindRejected, upstream.KindAccessDenied:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			ue.Provider+" rejected the stored credential; the customer must replace it", meta)
	case upstream.KindRateLimited:
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonUpstreamRateLimited, msg, ue.RetryAfter)
	case upstream.KindUnavailable, upstream.KindSessionInvalid:
		if errors.Is(err, context.DeadlineExceeded) {
			return apierr.New(codes.DeadlineExceeded, apierr.ReasonUpstreamUnavailable, "mint upstream session: deadline exceeded", meta)
		}
		return apierr.Retryable(codes.Unavailable, apierr.ReasonUpstreamUnavailable, msg, ue.RetryAfter)
	case upstream.KindNotAllowed:
		return apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed,
			"the credential's upstream address is not allowed (allow-list or an internal address)", meta)
	}
	return apierr.New(codes.Unavailable, apierr.ReasonUpstreamRefused, msg, meta)
}

// ListRetiredGenerations answers which of the given generations of the
// tenant's credentials are no longer current. The interceptor authorized
// sessions.resolve on the tenant; only the store is read.
func (c *sessionServer) ListRetiredGenerations(ctx context.Context, req *credentialsv1.ListRetiredGenerationsRequest) (*credentialsv1.ListRetiredGenerationsResponse, error) {
	s := c.s
	current := map[string]string{} // credential id → current generation ("" if gone)
	resp := &credentialsv1.ListRetiredGenerationsResponse{}
	for _, g := range req.GetGenerations() {
		gen, ok := current[g.GetCredentialId()]
		if !ok {
			rec, err := s.cfg.Store.GetCredential(ctx, req.GetTenantId(), g.GetCredentialId())
			switch {
			case errors.Is(err, store.ErrNotFound):
			case err != nil:
				return nil, s.toStatus(ctx, "list retired generations", err)
			default:
				gen = rec.Generation
			}
			current[g.GetCredentialId()] = gen
		}
		if gen != g.GetGeneration() {
			resp.Retired = append(resp.Retired, &credentialsv1.CredentialGeneration{CredentialId: g.GetCredentialId(), Generation: g.GetGeneration()})
		}
	}
	return resp, nil
}
