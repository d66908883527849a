package gateway

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

const (
	// maxRateWait bounds how long a call queues for an account's request
	// budget before it is answered RESOURCE_EXHAUSTED.
	maxRateWait = 5 * time.Second
	// reportTimeout bounds the best-effort rejection report.
	reportTimeout = 3 * time.Second
	// logoutTimeout bounds the best-effort upstream logout of a session the
	// gateway dropped or purged.
	logoutTimeout = 5 * time.Second
	// replaceGrace keeps a session cached this long past the time the
	// gateway stops using it, so the call that replaces it finds it and
	// logs it out upstream.
	replaceGrace = time.Minute
	// idleMargin is how much sooner than the upstream's idle timeout the
	// gateway drops a session nobody used: its last use is counted from
	// before the request went out, and clocks and networks are not exact.
	idleMargin = time.Minute
	// touchEvery is how often at most one replica extends a busy session's
	// cache entry (a Redis write); the entry then outlives its last use by
	// at least the idle bound minus this.
	touchEvery = 30 * time.Second
)

// idleBound is how long a session of p may stay cached unused; 0 if p's
// sessions do not idle out.
func idleBound(p provider.Provider) time.Duration {
	idle := p.Info().IdleTimeout
	if idle <= 0 {
		return 0
	}
	return max(idle-idleMargin, idle/2)
}

// cacheFor is how long a session minted now may stay cached: until the
// call that replaces it after its use-by (ttl) has logged it out, but for
// a session that idles out, no longer than it lives unused.
func cacheFor(p provider.Provider, ttl time.Duration) time.Duration {
	d := ttl + replaceGrace
	if b := idleBound(p); b > 0 {
		d = min(d, b)
	}
	return d
}

// touch extends a session's cache entry before a call uses it: a session
// that idles out stays cached for its idle bound after its last use (but
// never past its use-by and the replace grace). Each replica writes at most
// every touchEvery per session; a failed touch only makes the entry expire
// sooner, which costs a login.
func (s *Service) touch(ctx context.Context, p provider.Provider, entry tokencache.Entry, minted *credentialsv1.MintUpstreamSessionResponse) {
	bound := idleBound(p)
	if bound <= 0 {
		return
	}
	k := entry.Key()
	name := k.Tenant + "\x00" + k.Credential + "\x00" + k.Generation + "\x00" + k.BaseURL + "\x00" + k.Kind
	now := time.Now()
	if v, ok := s.touched.Load(name); ok && now.Sub(v.(time.Time)) < touchEvery {
		return
	}
	if s.touches.Add(1)%1024 == 0 {
		s.touched.Range(func(k, v any) bool { // forget sessions nobody used lately
			if now.Sub(v.(time.Time)) >= touchEvery {
				s.touched.Delete(k)
			}
			return true
		})
	}
	ttl := bound
	if exp := minted.GetExpireTime(); exp != nil {
		ttl = min(ttl, exp.AsTime().Add(replaceGrace).Sub(now))
	}
	if ttl < time.Millisecond {
		return
	}
	s.touched.Store(name, now)
	if err := s.cfg.Cache.Touch(ctx, entry, ttl); err != nil {
		s.touched.Delete(name)
		s.cfg.Logger.WarnContext(ctx, "could not extend a cached upstream session", "entry", entry, "error", err)
	}
}

// cacheKey binds a cached upstream session to the exact secret (the
// credential generation) and upstream (the base URL) it was minted for.
func cacheKey(sess *session, p provider.Provider) tokencache.Key {
	return tokencache.Key{Tenant: sess.tenantID, Credential: sess.credentialID, Generation: sess.generation,
		BaseURL: sess.baseURL, Kind: p.Info().TokenKind}
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

// conn lends a provider what one call on sess needs: the minted session
// (nil before a mint) and the primitives shared by every replica.
func (s *Service) conn(sess *session, minted *credentialsv1.MintUpstreamSessionResponse, key tokencache.Key) *provider.Conn {
	return &provider.Conn{
		Target:  sess.target(),
		Session: minted,
		Pace:    s.pace,
		Hold:    s.hold,
		Lock: func(ctx context.Context, name string) (func(), error) {
			return s.locks.lock(ctx, key, name)
		},
		Lease: func(ctx context.Context, name string, limit int, ttl time.Duration) (func(), error) {
			return s.leases.lease(ctx, key, name, limit, ttl)
		},
	}
}

// withUpstream runs call with the credential's shared upstream session and
// returns what the call returned. A session past the time the gateway may
// use it (the provider's CacheTTL) is replaced: dropped from the shared
// cache, logged out upstream, minted anew. On a lost session (Wialon error
// 1/1011, FleetUp 401: upstream.KindSessionInvalid) it drops that session
// — only if no replica replaced it meanwhile — logs it out (best effort),
// mints once more and calls once more; each try's value is its own.
func withUpstream[T any](ctx context.Context, s *Service, sess *session, p provider.Provider, call func(context.Context, *provider.Conn) (T, error)) (T, error) {
	var zero T
	if err := s.checkBaseURL(sess); err != nil {
		return zero, err
	}
	name, key := p.Info().Name, cacheKey(sess, p)
	replaced, retried := false, false
	for {
		entry, err := s.cfg.Cache.GetOrMint(ctx, key, authz.AuditedMint(name, s.mint(sess, p, key)))
		if err != nil {
			s.observeUpstream(name, err)
			return zero, s.upstreamFailed(sess, err)
		}
		minted, err := openEntry(entry, sess)
		if err != nil {
			// Never reached through the key binding; if it were, the value
			// must not be used for this credential.
			_ = s.cfg.Cache.Invalidate(ctx, entry)
			return zero, err
		}
		c := s.conn(sess, minted, key)
		if exp := minted.GetExpireTime(); !replaced && exp != nil && !time.Now().Before(exp.AsTime()) {
			replaced = true
			if err := s.cfg.Cache.Invalidate(ctx, entry); err != nil {
				return zero, err
			}
			s.logoutLater(ctx, p, c, "session replaced after its reuse bound")
			continue
		}
		s.touch(ctx, p, entry, minted)
		v, err := call(ctx, c)
		s.observeUpstream(name, err)
		if upstream.KindOf(err) == upstream.KindSessionInvalid && !retried {
			retried = true
			if err := s.cfg.Cache.Invalidate(ctx, entry); err != nil {
				return zero, err
			}
			s.logoutLater(ctx, p, c, "session lost upstream")
			continue
		}
		if err != nil {
			return zero, s.upstreamFailed(sess, err)
		}
		return v, nil
	}
}

// openEntry decodes a cached session and checks it belongs to sess's
// credential generation and upstream.
func openEntry(entry tokencache.Entry, sess *session) (*credentialsv1.MintUpstreamSessionResponse, error) {
	var minted credentialsv1.MintUpstreamSessionResponse
	if err := proto.Unmarshal([]byte(entry.Token()), &minted); err != nil {
		return nil, errors.New("cached upstream session is malformed")
	}
	if minted.GetCredentialGeneration() != sess.generation || minted.GetBaseUrl() != sess.baseURL {
		return nil, errCredentialChanged
	}
	return &minted, nil
}

// mint asks the credentials service for a new upstream session of exactly
// sess's credential generation. The long-lived secret never comes here:
// the credentials service logs in and returns only the session.
func (s *Service) mint(sess *session, p provider.Provider, key tokencache.Key) tokencache.MintFunc {
	return func(ctx context.Context) (string, time.Duration, error) {
		if err := p.BeforeMint(ctx, s.conn(sess, nil, key)); err != nil {
			return "", 0, err
		}
		minted, err := s.cfg.Sessions.MintUpstreamSession(ctx, &credentialsv1.MintUpstreamSessionRequest{
			Handle: sess.handle, CredentialGeneration: sess.generation})
		if err != nil {
			if apierr.Reason(err) == apierr.ReasonCredentialChanged {
				s.resolver.forget(sess.handle) // the caller's retry resolves afresh
			}
			return "", 0, err
		}
		if minted.GetCredentialGeneration() != sess.generation || minted.GetBaseUrl() != sess.baseURL {
			s.resolver.forget(sess.handle)
			return "", 0, errCredentialChanged
		}
		ttl := p.CacheTTL(minted)
		minted.SessionId = "" // the session is shared by every caller of the credential
		// In the cached copy, expire_time is when the gateway stops using
		// the session (the provider's CacheTTL from now), not the upstream's
		// expiry; the entry outlives it by replaceGrace, so the call that
		// replaces the session can log it out.
		minted.ExpireTime = timestamppb.New(time.Now().Add(ttl))
		value, err := proto.MarshalOptions{Deterministic: true}.Marshal(minted)
		if err != nil {
			return "", 0, fmt.Errorf("encode upstream session: %w", err)
		}
		s.afterMint(ctx, p, key, ttl+replaceGrace)
		s.cfg.Logger.InfoContext(ctx, "upstream session minted", "provider", p.Info().Name, "tenant_id", sess.tenantID,
			"credential_id", sess.credentialID, "version", sess.version, "generation", sess.generation, "cache_ttl", ttl)
		return string(value), cacheFor(p, ttl), nil
	}
}

// pace takes one slot of a shared request budget (provider.Conn.Pace).
func (s *Service) pace(ctx context.Context, budget string, limit provider.Limit) error {
	waitCtx, cancel := context.WithTimeout(ctx, maxRateWait)
	defer cancel()
	err := s.cfg.Limiter.Wait(waitCtx, budget, ratelimit.Limit{Rate: limit.Rate, Period: limit.Period, Burst: limit.Burst})
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// Our own bound ran out, not the caller's: the account is busy.
		return &ratelimit.LimitedError{Account: budget, RetryAfter: time.Second}
	}
	return err
}

// hold closes a shared request budget for d on every replica
// (provider.Conn.Hold): the upstream asked to wait.
func (s *Service) hold(ctx context.Context, budget string, limit provider.Limit, d time.Duration) error {
	return s.cfg.Limiter.Hold(ctx, budget, ratelimit.Limit{Rate: limit.Rate, Period: limit.Period, Burst: limit.Burst}, d)
}

// logoutLater ends a session the gateway dropped, upstream, without
// holding up the caller. Best effort: a failure is logged.
func (s *Service) logoutLater(ctx context.Context, p provider.Provider, c *provider.Conn, why string) {
	ctx = context.WithoutCancel(ctx)
	go func() {
		ctx, cancel := context.WithTimeout(ctx, logoutTimeout)
		defer cancel()
		s.logout(ctx, p, c, why)
	}()
}

func (s *Service) logout(ctx context.Context, p provider.Provider, c *provider.Conn, why string) {
	attrs := []any{"provider", p.Info().Name, "tenant_id", c.Tenant, "credential_id", c.Credential, "generation", c.Generation, "why", why}
	if err := p.Logout(ctx, c); err != nil {
		s.cfg.Logger.WarnContext(ctx, "upstream logout failed", append(attrs, "error", err)...)
		return
	}
	s.cfg.Logger.InfoContext(ctx, "upstream session logged out", attrs...)
}

// upstreamFailed reports a provider's rejection of the stored credential to
// the credentials service (so GetCredential shows it and no new sessions are
// issued) and passes err on. Rejections at login are recorded by the
// credentials service itself, which logs in; this covers a provider that
// rejects the credential on a data call.
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

var (
	errWrongProvider     = apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamRefused, "the session's credential belongs to another provider", nil)
	errUnknownProvider   = apierr.New(codes.FailedPrecondition, apierr.ReasonUpstreamRefused, "this gateway does not serve the session's provider", nil)
	errCredentialChanged = apierr.New(codes.Aborted, apierr.ReasonCredentialChanged, "the credential was replaced while the call was under way; retry", nil)
)
