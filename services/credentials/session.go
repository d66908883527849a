package credentials

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

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
	h, hash, memo, err := s.newHandle(req.GetRequestId() != "")
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	s.closeLegacyWindow(ctx)
	sessionID, err := handle.NewSessionID()
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	now := s.cfg.Now()
	sess := store.Session{
		HandleHash:   hash,
		SessionID:    sessionID,
		TenantID:     req.GetTenantId(),
		CredentialID: req.GetCredentialId(),
		Scopes:       scopes,
		CreateTime:   now,
		ExpireTime:   now.Add(ttl),
	}
	sess.Binding = s.cfg.HandleKeys.Bind(h, bindingParts(sess)...)
	idem, parts, err := s.idempotent(ctx, "issue", req.GetRequestId(), req)
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	idem.Memo = memo
	// One store call checks that the credential exists and is not
	// rejected, and registers and writes the session (one Redis round trip
	// on a single node).
	res, err := s.cfg.Store.CreateSession(ctx, sess, idem)
	if errors.Is(err, store.ErrRejected) {
		return nil, apierr.New(codes.FailedPrecondition, apierr.ReasonCredentialRejected,
			"the provider rejected this credential; replace it with PutCredential before issuing sessions", nil)
	}
	if err != nil {
		return nil, s.toStatus(ctx, "issue session", err)
	}
	if err := s.checkReplay(res.Replay, parts); err != nil {
		return nil, err
	}
	if res.Replayed {
		// The first call's session; its handle is derived again from the
		// seed stored with it (the handle itself was never stored).
		if h, err = s.handleFromMemo(res.Memo, res.Session.HandleHash); err != nil {
			return nil, s.toStatus(ctx, "issue session", err)
		}
		sess, sessionID = res.Session, res.Session.SessionID
		authz.SetSubject(ctx, sess.TenantID, sess.CredentialID, sessionID)
	}
	s.cfg.Logger.InfoContext(ctx, "session issued", append(logAttrsSession(sessionID, sess.TenantID, sess.CredentialID), "ttl", ttl, "replayed", res.Replayed)...)
	return &credentialsv1.IssueSessionResponse{
		Handle:     h,
		SessionId:  sessionID,
		ExpireTime: timestamppb.New(sess.ExpireTime),
		Scopes:     scopesToProto(sess.Scopes),
	}, nil
}

// RevokeSession deletes the session behind a handle; new calls with it fail
// at once.
func (c *sessionServer) RevokeSession(ctx context.Context, req *credentialsv1.RevokeSessionRequest) (*credentialsv1.RevokeSessionResponse, error) {
	s := c.s
	checked, err := s.verifier().Verify(ctx, req.GetHandle())
	if err != nil {
		return nil, apierr.Field("handle", "not a session handle (expected fbs_...)")
	}
	hash := checked.Hash
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
	s := c.s
	sess, rec, err := s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	return &credentialsv1.ResolveSessionResponse{
		SessionId:            sess.SessionID,
		TenantId:             sess.TenantID,
		CredentialId:         sess.CredentialID,
		CredentialVersion:    rec.Version,
		Provider:             s.providerID(rec.Provider),
		Scopes:               scopesToProto(sess.Scopes),
		ExpireTime:           timestamppb.New(sess.ExpireTime),
		BaseUrl:              rec.BaseURL,
		CredentialGeneration: rec.Generation,
		UpstreamAccount:      upstreamAccount(rec),
	}, nil
}

// upstreamAccount is the credential's public account id in decimal, or "".
func upstreamAccount(rec store.Credential) string {
	if rec.FleetUpAccountID == 0 {
		return ""
	}
	return strconv.FormatInt(rec.FleetUpAccountID, 10)
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
	checked, err := s.verifier().Verify(ctx, h)
	if err != nil {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	// The session and its credential in one read (one Redis round trip
	// on a single node): the credential is not used before the session's
	// binding and the caller's grant are checked.
	sess, rec, err := s.cfg.Store.GetSessionCredential(ctx, checked.Hash)
	if errors.Is(err, store.ErrNotFound) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	if err != nil {
		return store.Session{}, store.Credential{}, s.toStatus(ctx, "resolve session", err)
	}
	if !s.cfg.Now().Before(sess.ExpireTime) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	if !s.bound(h, checked, sess) {
		s.cfg.Logger.WarnContext(ctx, "session record does not match its binding: written or changed by someone without the handle key",
			logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID)...)
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	authz.SetSubject(ctx, sess.TenantID, sess.CredentialID, sess.SessionID)
	if err := s.cfg.Authorizer.Require(ctx, policy.SessionsResolve, sess.TenantID); err != nil {
		return store.Session{}, store.Credential{}, err
	}
	if rec == nil || sess.CreateTime.Before(rec.CreateTime) {
		return store.Session{}, store.Credential{}, errSessionInvalid
	}
	return sess, *rec, nil
}

// closeLegacyWindow records, once per replica and only if no replica did
// before, when legacy handles stop being accepted: the first keyed handle
// marks the moment this release took over issuing. A failure is logged and
// tried again at the next issue; the window stays open meanwhile.
func (s *Service) closeLegacyWindow(ctx context.Context) {
	if s.cfg.WriteLegacyFormats || s.cfg.LegacyHandles == nil || s.legacyClosed.Load() {
		return
	}
	until, err := s.cfg.LegacyHandles.Close(ctx, s.cfg.LegacyHandleLifetime)
	if err != nil {
		s.cfg.Logger.WarnContext(ctx, "could not record the end of legacy session handles; trying again at the next issue", "error", err)
		return
	}
	s.legacyClosed.Store(true)
	s.cfg.Logger.InfoContext(ctx, "legacy session handles (CRC32 checksum) are accepted until they can all have expired", "until", until)
}

// verifier checks handles: keyed ones by their MAC, legacy ones only while
// their window is open.
func (s *Service) verifier() handle.Verifier {
	return handle.Verifier{Keys: s.cfg.HandleKeys, Legacy: s.cfg.LegacyHandles}
}

// newHandle makes the handle of a new session. With derived set (the
// request has an id) the handle is derived from a fresh seed, which the
// memo carries into the store so a retry gets the same handle back.
// Under --write-legacy-formats it carries a CRC32 checksum.
func (s *Service) newHandle(derived bool) (h string, hash handle.Hash, memo string, err error) {
	keys := s.cfg.HandleKeys
	if !derived {
		if s.cfg.WriteLegacyFormats {
			h, hash, err = handle.NewLegacy()
		} else {
			h, hash, err = keys.New()
		}
		return h, hash, "", err
	}
	seed, err := handle.NewSeed()
	if err != nil {
		return "", handle.Hash{}, "", err
	}
	format := memoKeyed
	if s.cfg.WriteLegacyFormats {
		format = memoLegacy
	}
	memo = format + "." + keys.SigningKeyID() + "." + base64.RawURLEncoding.EncodeToString(seed)
	h, err = s.handleFromMemo(memo, handle.Hash{})
	if err != nil {
		return "", handle.Hash{}, "", err
	}
	return h, handle.Hash(sha256.Sum256([]byte(h))), memo, nil
}

// Formats of a handle memo: "<format>.<key id>.<seed>".
const (
	memoKeyed  = "k"
	memoLegacy = "l"
)

// handleFromMemo derives the handle a memo describes and, unless want is
// zero, checks it is the one whose hash was stored.
func (s *Service) handleFromMemo(memo string, want handle.Hash) (string, error) {
	parts := strings.Split(memo, ".")
	if len(parts) != 3 {
		return "", errors.New("malformed handle memo")
	}
	seed, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return "", errors.New("malformed handle memo")
	}
	derive := s.cfg.HandleKeys.FromSeed
	if parts[0] == memoLegacy {
		derive = s.cfg.HandleKeys.LegacyFromSeed
	}
	h, hash, err := derive(parts[1], seed)
	if err != nil {
		return "", fmt.Errorf("derive the handle of a repeated request: its key %s is no longer configured", parts[1])
	}
	if want != (handle.Hash{}) && hash != want {
		return "", errors.New("the handle derived for a repeated request does not match its session")
	}
	return h, nil
}

// bindingParts are the session fields its binding covers: all that
// decides what the handle may do, and until when.
func bindingParts(sess store.Session) []string {
	return []string{sess.SessionID, sess.TenantID, sess.CredentialID, strings.Join(sess.Scopes, ","),
		sess.CreateTime.UTC().Format(time.RFC3339Nano), sess.ExpireTime.UTC().Format(time.RFC3339Nano)}
}

// bound reports whether sess may be served for handle h: its binding must
// be the handle key's MAC of its contents and h. Only sessions of legacy
// handles, issued by releases before bindings, may have none.
func (s *Service) bound(h string, c handle.Checked, sess store.Session) bool {
	if sess.Binding == "" {
		return c.Legacy
	}
	return s.cfg.HandleKeys.VerifyBinding(h, sess.Binding, bindingParts(sess)...)
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
