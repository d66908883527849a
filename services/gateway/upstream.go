package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/ratelimit"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

const (
	// maxRateWait bounds how long a call queues for the FleetUp account's
	// rate budget before it is answered RESOURCE_EXHAUSTED.
	maxRateWait = 5 * time.Second
	// reportTimeout bounds the best-effort rejection report.
	reportTimeout = 3 * time.Second
)

// fleetupToken is what the gateway caches for a FleetUp account: the JWT
// and the API key that must travel with it. Both are secret; tokencache
// seals the whole value before it reaches Redis.
type fleetupToken struct {
	JWT       string `json:"jwt"`
	APIKey    string `json:"key"`
	AccountID int64  `json:"acct"`
}

func cacheKey(sess *session, kind string) tokencache.Key {
	return tokencache.Key{Tenant: sess.tenantID, Credential: sess.credentialID, Version: sess.version, Kind: kind}
}

// checkBaseURL re-checks the credential's base URL against this gateway's
// allow-list before any upstream call.
func (s *Service) checkBaseURL(sess *session) error {
	if err := s.cfg.AllowList.Check(sess.baseURL); err != nil {
		return apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamNotAllowed,
			"the credential's base URL is not on this gateway's allow-list", map[string]string{"session_id": sess.sessionID})
	}
	return nil
}

// withWialon runs call with the credential's shared Wialon session. On
// error 1 / 1011 (session gone) it drops that session from the shared cache
// — only if no replica replaced it meanwhile — logs in once more and retries
// once.
func (s *Service) withWialon(ctx context.Context, sess *session, call func(ctx context.Context, sid string) error) error {
	if sess.provider != credentialsv1.Provider_PROVIDER_WIALON {
		return errWrongProvider
	}
	if err := s.checkBaseURL(sess); err != nil {
		return err
	}
	key := cacheKey(sess, tokencache.KindWialonEID)
	release, err := s.wialonSlot(ctx, key)
	if err != nil {
		return err
	}
	defer release()
	for attempt := 0; ; attempt++ {
		entry, err := s.cfg.Cache.GetOrMint(ctx, key, authz.AuditedMint(wialonProvider, s.mintWialon(sess)))
		if err != nil {
			s.observeUpstream(wialonProvider, err)
			return s.upstreamFailed(sess, err)
		}
		err = call(ctx, entry.Token())
		s.observeUpstream(wialonProvider, err)
		if upstream.KindOf(err) == upstream.KindSessionInvalid && attempt == 0 {
			if err := s.cfg.Cache.Invalidate(ctx, entry); err != nil {
				return err
			}
			continue
		}
		return s.upstreamFailed(sess, err)
	}
}

// withWialonLoader is withWialon for calls that use the session's message
// loader: it holds the loader lock of the shared session across replicas.
func (s *Service) withWialonLoader(ctx context.Context, sess *session, call func(ctx context.Context, sid string) error) error {
	release, err := s.loader.lock(ctx, cacheKey(sess, tokencache.KindWialonEID))
	if err != nil {
		return err
	}
	defer release()
	return s.withWialon(ctx, sess, call)
}

func (s *Service) mintWialon(sess *session) tokencache.MintFunc {
	return func(ctx context.Context) (string, time.Duration, error) {
		sec, err := s.cfg.Sessions.ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: sess.handle})
		if err != nil {
			return "", 0, err
		}
		if sec.GetWialon() == nil {
			return "", 0, errWrongProvider
		}
		ws, err := s.cfg.Wialon.Login(ctx, sess.baseURL, sec.GetWialon().GetToken())
		if err != nil {
			return "", 0, err
		}
		s.cfg.Logger.InfoContext(ctx, "wialon login", "tenant_id", sess.tenantID, "credential_id", sess.credentialID, "version", sess.version)
		return ws.SID, s.cfg.WialonSessionTTL, nil
	}
}

// wialonSlot takes one of the credential's concurrent-request slots in
// this replica, waiting at most as long as ctx allows.
func (s *Service) wialonSlot(ctx context.Context, key tokencache.Key) (func(), error) {
	v, _ := s.wialonSlots.LoadOrStore(key, make(chan struct{}, s.cfg.WialonConcurrency))
	slots := v.(chan struct{})
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	case <-ctx.Done():
		return func() {}, ctx.Err()
	}
}

// withFleetUp runs call with the account's shared JWT. On 401 it drops that
// JWT — only if it is still the cached one — mints once more and retries
// once. Every upstream request first takes a slot of the account's rate
// budget, shared by all replicas through Redis.
func (s *Service) withFleetUp(ctx context.Context, sess *session, call func(ctx context.Context, auth fleetup.Auth) error) error {
	if sess.provider != credentialsv1.Provider_PROVIDER_FLEETUP {
		return errWrongProvider
	}
	if err := s.checkBaseURL(sess); err != nil {
		return err
	}
	key := cacheKey(sess, tokencache.KindFleetUpJWT)
	for attempt := 0; ; attempt++ {
		entry, err := s.cfg.Cache.GetOrMint(ctx, key, authz.AuditedMint(fleetupProvider, s.mintFleetUp(sess)))
		if err != nil {
			s.observeUpstream(fleetupProvider, err)
			return s.upstreamFailed(sess, err)
		}
		var tok fleetupToken
		if err := json.Unmarshal([]byte(entry.Token()), &tok); err != nil {
			return errors.New("cached fleetup token is malformed")
		}
		if err := s.fleetupRate(ctx, tok.AccountID); err != nil {
			s.observeUpstream(fleetupProvider, err)
			return err
		}
		err = call(ctx, fleetup.Auth{BaseURL: sess.baseURL, APIKey: tok.APIKey, JWT: tok.JWT, AccountID: tok.AccountID})
		s.observeUpstream(fleetupProvider, err)
		if upstream.KindOf(err) == upstream.KindSessionInvalid && attempt == 0 {
			if err := s.cfg.Cache.Invalidate(ctx, entry); err != nil {
				return err
			}
			continue
		}
		return s.upstreamFailed(sess, err)
	}
}

func (s *Service) mintFleetUp(sess *session) tokencache.MintFunc {
	return func(ctx context.Context) (string, time.Duration, error) {
		sec, err := s.cfg.Sessions.ResolveSecret(ctx, &credentialsv1.ResolveSecretRequest{Handle: sess.handle})
		if err != nil {
			return "", 0, err
		}
		fu := sec.GetFleetup()
		if fu == nil {
			return "", 0, errWrongProvider
		}
		if err := s.fleetupRate(ctx, fu.GetAccountId()); err != nil {
			return "", 0, err
		}
		tok, err := s.cfg.FleetUp.MintToken(ctx, sess.baseURL, fu.GetApiKey(), fu.GetAccountId(), fu.GetSecret())
		if err != nil {
			return "", 0, err
		}
		value, err := json.Marshal(fleetupToken{JWT: tok.JWT, APIKey: fu.GetApiKey(), AccountID: fu.GetAccountId()})
		if err != nil {
			return "", 0, err
		}
		s.cfg.Logger.InfoContext(ctx, "fleetup token minted", "tenant_id", sess.tenantID, "credential_id", sess.credentialID, "version", sess.version, "expires", tok.Expiry)
		return string(value), s.jwtCacheTTL(tok.Expiry), nil
	}
}

// jwtCacheTTL caches a JWT until its exp minus the safety margin, so it is
// replaced ahead of expiry; a JWT that already lives less than the margin is
// cached for half its remaining life (at least a second).
func (s *Service) jwtCacheTTL(expiry time.Time) time.Duration {
	left := time.Until(expiry)
	if ttl := left - s.cfg.JWTSafetyMargin; ttl > 0 && ttl > left/2 {
		return ttl
	}
	return max(left/2, time.Second)
}

// fleetupRate takes a slot of the account's shared rate budget.
func (s *Service) fleetupRate(ctx context.Context, accountID int64) error {
	account := "fleetup:" + strconv.FormatInt(accountID, 10)
	waitCtx, cancel := context.WithTimeout(ctx, maxRateWait)
	defer cancel()
	err := s.cfg.Limiter.Wait(waitCtx, account, s.cfg.FleetUpRate)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// Our own bound ran out, not the caller's: the account is busy.
		return &ratelimit.LimitedError{Account: account, RetryAfter: time.Second}
	}
	return err
}

// upstreamFailed reports a provider's rejection of the stored credential to
// the credentials service (so GetCredential shows it and no new sessions are
// issued) and passes err on.
func (s *Service) upstreamFailed(sess *session, err error) error {
	if upstream.KindOf(err) != upstream.KindRejected {
		return err
	}
	var ue *upstream.Error
	errors.As(err, &ue)
	reason := fmt.Sprintf("%s %s answered %s", ue.Provider, ue.Op, ue.Kind)
	ctx, cancel := context.WithTimeout(context.Background(), reportTimeout)
	defer cancel()
	if _, rerr := s.cfg.Sessions.ReportRejection(ctx, &credentialsv1.ReportRejectionRequest{Handle: sess.handle, CredentialVersion: sess.version, Reason: reason}); rerr != nil {
		s.cfg.Logger.Warn("could not report credential rejection", "session_id", sess.sessionID, "error", rerr)
	}
	s.cfg.Logger.Warn("provider rejected stored credential", "tenant_id", sess.tenantID, "credential_id", sess.credentialID, "version", sess.version, "provider", ue.Provider)
	return err
}

var errWrongProvider = apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamRefused, "the session's credential belongs to another provider", nil)
