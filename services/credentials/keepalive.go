package credentials

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Keep-alive: Wialon deletes a token nobody used for 100 days
// (upstream-facts.md, "Tokens"), so a credential whose callers are quiet
// for a season would be lost. The keep-alive runs here, where the secret
// is: a sweep walks the stored credentials and validates (logs in and out
// with) each one of a provider.KeepAliver that was not used upstream
// within the provider's interval, recording the use (last_used_time) as
// every mint and validation does.
//
// Sweeps are scheduled across replicas by a lease in Redis,
// <prefix>:keepalive, taken with SET NX for one sweep interval and never
// released: whichever replica takes it runs that interval's sweep, and no
// other replica sweeps until it expires. A replica that dies mid-sweep
// leaves the rest to the next interval. Keep-alive logins are background
// work: they leave half of the egress IP's login budget to logins callers
// are waiting for (provider.Background).

// DefaultKeepAliveSweep is how often one replica looks for credentials
// that need a keep-alive login (--keepalive-sweep).
const DefaultKeepAliveSweep = time.Hour

// keepAliveLoginTimeout bounds one keep-alive login, waiting for the login
// budget included.
const keepAliveLoginTimeout = 2 * time.Minute

// KeepAliveResult counts what a sweep did.
type KeepAliveResult struct {
	// Seen counts credentials of providers that need keep-alives.
	Seen int
	// Kept counts credentials logged in with and recorded as used.
	Kept int
	// Rejected counts credentials the provider refused (now marked
	// rejected), Failed those whose login failed otherwise.
	Rejected, Failed int
	// Skipped is true when another replica holds this interval's lease.
	Skipped bool
}

// recordUse records that rec's secret was just used upstream. A failure is
// logged: the use happened, and the keep-alive only logs in again sooner.
func (s *Service) recordUse(ctx context.Context, rec store.Credential) {
	err := s.cfg.Store.RecordUse(ctx, rec.TenantID, rec.CredentialID, rec.Version, s.cfg.Now())
	if err != nil && !errors.Is(err, store.ErrVersionConflict) && !errors.Is(err, store.ErrNotFound) {
		s.cfg.Logger.WarnContext(ctx, "could not record the credential's last use", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "error", err)
	}
}

// RunKeepAlive sweeps every interval (DefaultKeepAliveSweep if 0) until
// ctx ends, on one replica at a time.
func (s *Service) RunKeepAlive(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultKeepAliveSweep
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		res, err := s.SweepKeepAlive(ctx, interval)
		if err != nil && ctx.Err() == nil {
			s.cfg.Logger.WarnContext(ctx, "keep-alive sweep stopped", "error", err, "kept", res.Kept)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// SweepKeepAlive runs one sweep if no replica ran one within interval,
// and stops after half of it.
func (s *Service) SweepKeepAlive(ctx context.Context, interval time.Duration) (KeepAliveResult, error) {
	var res KeepAliveResult
	if interval <= 0 {
		interval = DefaultKeepAliveSweep
	}
	if ok, err := s.takeKeepAliveLease(ctx, interval); err != nil || !ok {
		res.Skipped = err == nil
		return res, err
	}
	ctx, cancel := context.WithTimeout(ctx, interval/2)
	defer cancel()
	now := s.cfg.Now()
	err := s.cfg.Store.ForEachCredential(ctx, func(rec store.Credential) error {
		p, ok := s.cfg.Providers.ByName(rec.Provider)
		if !ok {
			return nil
		}
		ka, ok := p.(provider.KeepAliver)
		if !ok || ka.KeepAliveInterval() <= 0 {
			return nil
		}
		res.Seen++
		last := rec.LastUsedTime
		if last.IsZero() {
			last = rec.UpdateTime // stored then; never used by the broker since
		}
		if rec.ValidationState == store.ValidationRejected || now.Sub(last) < ka.KeepAliveInterval() {
			return nil
		}
		return s.keepAlive(ctx, rec, &res)
	})
	s.cfg.Logger.InfoContext(ctx, "keep-alive sweep done", "seen", res.Seen, "kept", res.Kept, "rejected", res.Rejected, "failed", res.Failed)
	if errors.Is(err, context.DeadlineExceeded) {
		err = nil // the rest waits for the next sweep
	}
	return res, err
}

// keepAlive logs in and out with rec's secret and records the use. Only a
// spent login budget, or the end of the sweep, stops the sweep.
func (s *Service) keepAlive(ctx context.Context, rec store.Credential, res *KeepAliveResult) error {
	attrs := []any{"tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "provider", rec.Provider}
	if err := s.cfg.AllowList.Check(rec.BaseURL); err != nil {
		res.Failed++
		return nil
	}
	sec, err := s.decrypt(ctx, rec)
	if err != nil {
		res.Failed++
		s.cfg.Logger.WarnContext(ctx, "keep-alive: the secret does not open", append(attrs, "error", err)...)
		return nil
	}
	lctx, cancel := context.WithTimeout(provider.Background(ctx), keepAliveLoginTimeout)
	defer cancel()
	_, err = sec.p.Validate(lctx, rec.BaseURL, sec.msg)
	switch kind := upstream.KindOf(err); {
	case err == nil:
		res.Kept++
		s.recordUse(ctx, rec)
		s.cfg.Logger.InfoContext(ctx, "keep-alive login", attrs...)
	case kind == upstream.KindRejected || kind == upstream.KindAccessDenied:
		res.Rejected++
		s.recordLoginRejection(ctx, rec, err)
	case kind == upstream.KindRateLimited || ctx.Err() != nil:
		res.Failed++
		return err
	default:
		res.Failed++
		s.cfg.Logger.WarnContext(ctx, "keep-alive login failed", append(attrs, "error", err)...)
	}
	return nil
}

// takeKeepAliveLease takes this interval's sweep lease; false if another
// replica holds it. Without a shared Redis every sweep runs.
func (s *Service) takeKeepAliveLease(ctx context.Context, interval time.Duration) (bool, error) {
	if s.cfg.Redis == nil {
		return true, nil
	}
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return false, err
	}
	return s.cfg.Redis.SetNX(ctx, s.cfg.RedisPrefix+":keepalive", hex.EncodeToString(b), interval).Result()
}
