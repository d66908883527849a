package credentials

import (
	"context"
	"errors"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Scope names as stored in session records.
const (
	scopeRead = "read"
	scopeRaw  = "raw"
)

// errSessionInvalid is the one answer for every handle that does not open a
// session: malformed, unknown, expired, revoked, or its credential gone. One
// answer means a caller learns nothing about which it was.
var errSessionInvalid = apierr.New(codes.Unauthenticated, apierr.ReasonSessionInvalid, "session handle is invalid, expired or revoked", nil)

// IssueSession makes a new handle for one credential. The credential must
// exist and must not be known to be rejected by its provider.
func (c *sessionServer) IssueSession(ctx context.Context, req *credentialsv1.IssueSessionRequest) (*credentialsv1.IssueSessionResponse, error) {
	s := c.s
	ttl := DefaultSessionTTL
	if req.GetTtl() != nil {
		ttl = req.GetTtl().AsDuration()
	}
	if ttl > s.cfg.MaxSessionTTL {
		return nil, apierr.Field("ttl", "ttl "+ttl.String()+" is above the maximum "+s.cfg.MaxSessionTTL.String())
	}
	scopes := scopesFromProto(req.GetScopes())
	grantable := s.cfg.Authorizer.GrantableScopes(ctx, req.GetTenantId())
	for _, sc := range scopes {
		if !slices.Contains(grantable, sc) {
			return nil, apierr.New(codes.PermissionDenied, apierr.ReasonPermissionDenied,
				"the policy does not let this caller grant scope "+sc+" on tenant "+req.GetTenantId(), map[string]string{"scope": sc})
		}
	}
	rec, err := s.cfg.Store.GetCredential(ctx, req.GetTenantId(), req.GetCredentialId())
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	if rec.ValidationState == store.ValidationRejected {
		return nil, apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			"the provider rejected this credential; replace it with PutCredential before issuing sessions", nil)
	}
	h, hash, err := handle.New()
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	sessionID, err := handle.NewSessionID()
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	now := s.cfg.Now()
	sess := store.Session{
		HandleHash:   hash,
		SessionID:    sessionID,
		TenantID:     rec.TenantID,
		CredentialID: rec.CredentialID,
		Scopes:       scopes,
		CreateTime:   now,
		ExpireTime:   now.Add(ttl),
	}
	if err := s.cfg.Store.CreateSession(ctx, sess); err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	s.cfg.Logger.InfoContext(ctx, "session issued", append(logAttrsSession(sessionID, rec.TenantID, rec.CredentialID), "ttl", ttl)...)
	return &credentialsv1.IssueSessionResponse{
		Handle:     h,
		SessionId:  sessionID,
		ExpireTime: timestamppb.New(sess.ExpireTime),
		Scopes:     scopesToProto(scopes),
	}, nil
}

// RevokeSession deletes the session behind a handle; new calls with it fail
// at once.
func (c *sessionServer) RevokeSession(ctx context.Context, req *credentialsv1.RevokeSessionRequest) (*credentialsv1.RevokeSessionResponse, error) {
	s := c.s
	hash, err := handle.Parse(req.GetHandle())
	if err != nil {
		return nil, apierr.Field("handle", "not a session handle (expected fbs_...)")
	}
	errNoSession := apierr.New(codes.NotFound, apierr.ReasonSessionNotFound, "no live session for this handle", nil)
	live, err := s.cfg.Store.GetSession(ctx, hash)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errNoSession
	}
	if err != nil {
		return nil, s.toStatus(ctx, "revoke session", err)
	}
	authz.SetSubject(ctx, live.TenantID, live.CredentialID, live.SessionID)
	if err := s.cfg.Authorizer.Require(ctx, policy.SessionsRevoke, live.TenantID); err != nil {
		return nil, err
	}
	sess, err := s.cfg.Store.DeleteSession(ctx, hash)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errNoSession
	}
	if err != nil {
		return nil, s.toStatus(ctx, "revoke session", err)
	}
	s.cfg.Logger.InfoContext(ctx, "session revoked", logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID)...)
	return &credentialsv1.RevokeSessionResponse{SessionId: sess.SessionID}, nil
}

// ResolveSession returns what a live handle is scoped to, without Vault.
func (c *sessionServer) ResolveSession(ctx context.Context, req *credentialsv1.ResolveSessionRequest) (*credentialsv1.ResolveSessionResponse, error) {
	sess, rec, err := c.s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	return &credentialsv1.ResolveSessionResponse{
		SessionId:            sess.SessionID,
		TenantId:             sess.TenantID,
		CredentialId:         sess.CredentialID,
		CredentialVersion:    rec.Version,
		Provider:             providerToProto(rec.Provider),
		Scopes:               scopesToProto(sess.Scopes),
		ExpireTime:           timestamppb.New(sess.ExpireTime),
		BaseUrl:              rec.BaseURL,
		CredentialGeneration: rec.Generation,
	}, nil
}

// ResolveSecret returns the decrypted secret behind a live handle.
func (c *sessionServer) ResolveSecret(ctx context.Context, req *credentialsv1.ResolveSecretRequest) (*credentialsv1.ResolveSecretResponse, error) {
	s := c.s
	sess, rec, err := s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	sec, err := s.decrypt(ctx, rec)
	if err != nil {
		return nil, s.toStatus(ctx, "resolve secret", err)
	}
	resp := &credentialsv1.ResolveSecretResponse{SessionId: sess.SessionID, CredentialVersion: rec.Version}
	switch {
	case sec.wialon != nil:
		resp.Secret = &credentialsv1.ResolveSecretResponse_Wialon{Wialon: sec.wialon}
	case sec.fleetup != nil:
		resp.Secret = &credentialsv1.ResolveSecretResponse_Fleetup{Fleetup: sec.fleetup}
	}
	s.cfg.Logger.InfoContext(ctx, "secret resolved", append(logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID), "version", rec.Version)...)
	return resp, nil
}

// ReportRejection marks the credential behind a live handle as rejected by
// its provider, if it is still at the reported version.
func (c *sessionServer) ReportRejection(ctx context.Context, req *credentialsv1.ReportRejectionRequest) (*credentialsv1.ReportRejectionResponse, error) {
	s := c.s
	sess, rec, err := s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	if rec.Version != req.GetCredentialVersion() {
		return &credentialsv1.ReportRejectionResponse{}, nil // already replaced: the report is stale
	}
	msg := "provider rejected the credential"
	if req.GetReason() != "" {
		msg += ": " + req.GetReason()
	}
	v := store.Validation{State: store.ValidationRejected, Message: msg, UpstreamUser: rec.UpstreamUser, Time: s.cfg.Now()}
	_, err = s.cfg.Store.SetValidation(ctx, rec.TenantID, rec.CredentialID, rec.Version, v)
	if err != nil && !errors.Is(err, store.ErrVersionConflict) {
		return nil, s.toStatus(ctx, "report rejection", err)
	}
	if err == nil {
		s.emitRejected(ctx, rec, msg)
	}
	s.cfg.Logger.WarnContext(ctx, "credential rejected upstream", append(logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID), "version", rec.Version)...)
	return &credentialsv1.ReportRejectionResponse{}, nil
}

// resolve checks a handle and returns its live session and credential. A
// session whose credential is gone, or was deleted and re-created after the
// session was issued, does not resolve: deleting a credential revokes its
// sessions even if a crash left a session record behind.
func (s *Service) resolve(ctx context.Context, h string) (store.Session, store.Credential, error) {
	hash, err := handle.Parse(h)
	if err != nil {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	sess, err := s.cfg.Store.GetSession(ctx, hash)
	if errors.Is(err, store.ErrNotFound) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	if err != nil {
		return store.Session{}, store.Credential{}, s.toStatus(ctx, "resolve session", err)
	}
	if !s.cfg.Now().Before(sess.ExpireTime) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	authz.SetSubject(ctx, sess.TenantID, sess.CredentialID, sess.SessionID)
	if err := s.cfg.Authorizer.Require(ctx, policy.SessionsResolve, sess.TenantID); err != nil {
		return store.Session{}, store.Credential{}, err
	}
	rec, err := s.cfg.Store.GetCredential(ctx, sess.TenantID, sess.CredentialID)
	if errors.Is(err, store.ErrNotFound) || (err == nil && sess.CreateTime.Before(rec.CreateTime)) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	if err != nil {
		return store.Session{}, store.Credential{}, s.toStatus(ctx, "resolve session", err)
	}
	return sess, rec, nil
}

func scopesFromProto(in []credentialsv1.Scope) []string {
	if len(in) == 0 {
		return []string{scopeRead}
	}
	out := make([]string, 0, len(in))
	for _, sc := range in {
		switch sc {
		case credentialsv1.Scope_SCOPE_READ:
			out = append(out, scopeRead)
		case credentialsv1.Scope_SCOPE_RAW:
			out = append(out, scopeRaw)
		}
	}
	return out
}

func scopesToProto(in []string) []credentialsv1.Scope {
	out := make([]credentialsv1.Scope, 0, len(in))
	for _, sc := range in {
		switch sc {
		case scopeRead:
			out = append(out, credentialsv1.Scope_SCOPE_READ)
		case scopeRaw:
			out = append(out, credentialsv1.Scope_SCOPE_RAW)
		}
	}
	return out
}
