package transit

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"time"

	"github.com/hashicorp/vault/api"
)

// Retry delays of the lifecycle goroutine, for logins and token lookups
// after a failure: doubling from retryMin up to retryMax, with jitter.
const (
	retryMin = time.Second
	retryMax = time.Minute
)

// recheckInterval is the least time between two token lookups prompted by
// Vault refusing a request (see noteRefusal).
const recheckInterval = 5 * time.Second

// run is the lifecycle goroutine, started by NewVault and stopped by Close.
// It keeps the token in secret alive, and when that is no longer possible
// logs in again (approle, kubernetes) or says so loudly (token).
func (v *Vault) run(secret *api.Secret) {
	defer close(v.done)
	for v.keepAlive(secret) {
		if v.login == nil {
			v.watchDeadToken()
			return
		}
		var ok bool
		if secret, ok = v.relogin(); !ok {
			return
		}
	}
}

// keepAlive renews secret's token with an api.LifetimeWatcher (a token that
// never expires needs none) until the token can no longer be renewed or,
// with a login method, Vault no longer knows it. It returns false when
// Close stopped it, true when the token needs replacing.
func (v *Vault) keepAlive(secret *api.Secret) bool {
	var renewed <-chan *api.RenewOutput
	var done <-chan error
	stop := func() {}
	if secret.Auth.LeaseDuration > 0 {
		w, err := v.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret})
		if err != nil { // only for missing input
			v.logger.Error("vault token watcher", "error", err)
			return true
		}
		go w.Start()
		renewed, done = w.RenewCh(), w.DoneCh()
		stop = func() {
			w.Stop()
			<-done // Start has returned
		}
	}
	for {
		select {
		case r := <-renewed:
			v.logRenewal(r)
		case err := <-done: // Start has returned
			v.logRenewalEnd(err)
			return true
		case <-v.recheck:
			if v.tokenRejected() {
				stop()
				v.logger.Warn("vault no longer accepts the token (revoked?); logging in again", "method", v.method)
				return true
			}
		case <-v.ctx.Done():
			stop()
			return false
		}
	}
}

func (v *Vault) logRenewal(r *api.RenewOutput) {
	ttl := 0
	if r.Secret != nil && r.Secret.Auth != nil {
		ttl = r.Secret.Auth.LeaseDuration
	}
	v.logger.Info("vault token renewed", "ttl_seconds", ttl)
}

func (v *Vault) logRenewalEnd(err error) {
	if v.login == nil {
		if err != nil {
			v.logger.Error("vault token renewal failed; the token will expire", "error", describeRenewError(err))
		} else {
			v.logger.Error("vault token cannot be renewed any further; it will expire")
		}
		return
	}
	if err != nil {
		v.logger.Warn("vault token renewal failed; logging in again", "method", v.method, "error", describeRenewError(err))
	} else {
		v.logger.Info("vault token cannot be renewed any further (max TTL, or not renewable); logging in again", "method", v.method)
	}
}

// describeRenewError keeps Vault's response body out of logs.
func describeRenewError(err error) string {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return fmt.Sprintf("status %d", re.StatusCode)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return "renewal error"
}

// noteRefusal is called for every 403 from Vault. With a login method it
// asks the lifecycle goroutine to check the token: a revoked token is
// otherwise only noticed when it was due to expire.
func (v *Vault) noteRefusal() {
	if v.login == nil {
		return
	}
	select {
	case v.recheck <- struct{}{}:
	default: // a check is already pending
	}
}

// tokenRejected looks the token up, at most once per recheckInterval, and
// reports whether Vault refused it: a 403 on a request may also be a
// policy that does not allow it, which a new login would not change.
func (v *Vault) tokenRejected() bool {
	if time.Since(v.lastCheck) < recheckInterval {
		return false
	}
	v.lastCheck = time.Now()
	_, err := v.lookupSelf(v.ctx)
	var se *statusError
	return errors.As(err, &se) && se.status == http.StatusForbidden
}

// relogin logs in until it succeeds or Close stops it, waiting longer
// after each failure.
func (v *Vault) relogin() (*api.Secret, bool) {
	for attempt := 0; ; attempt++ {
		secret, err := v.logIn(v.ctx)
		if err == nil {
			return secret, true
		}
		if v.ctx.Err() != nil {
			return nil, false
		}
		delay := retryDelay(attempt)
		v.logger.Error("vault login failed; Vault calls fail until it succeeds", "method", v.method,
			"error", err, "retry_in", delay.Round(time.Millisecond))
		if !sleep(v.ctx, delay) {
			return nil, false
		}
	}
}

// logIn logs in with the configured method on a token-less copy of the
// client, then hands the new token to the client.
func (v *Vault) logIn(ctx context.Context) (*api.Secret, error) {
	c, err := v.client.CloneWithHeaders() // the namespace is a header
	if err != nil {
		return nil, fmt.Errorf("vault transit %s login: %w: %v", v.method, ErrInvalid, err)
	}
	c.ClearToken() // NewClient may have read VAULT_TOKEN
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	secret, err := v.login(ctx, c)
	if err != nil {
		return nil, err
	}
	v.client.SetToken(secret.Auth.ClientToken)
	v.logins.Add(1)
	v.logger.Info("logged in to vault", "method", v.method, "ttl_seconds", secret.Auth.LeaseDuration,
		"renewable", secret.Auth.Renewable, "policies", secret.Auth.TokenPolicies)
	return secret, nil
}

// watchDeadToken runs with the token method once the token can no longer
// be renewed. There is nothing to log in again with, so it keeps looking
// the token up, with backoff, and logs an error each time, until Close.
func (v *Vault) watchDeadToken() {
	for attempt := 0; sleep(v.ctx, retryDelay(attempt)); attempt++ {
		info, err := v.lookupSelf(v.ctx)
		switch {
		case v.ctx.Err() != nil:
			return
		case err == nil:
			v.logger.Error("vault token cannot be renewed and expires soon; restart the service with a new token",
				"ttl_seconds", info.TTL)
		case errors.Is(err, ErrInvalid):
			v.logger.Error("vault token is no longer valid; Vault calls fail until the service is restarted with a new token",
				"error", err)
		default:
			v.logger.Error("vault token lookup failed", "error", err)
		}
	}
}

// retryDelay is the wait before retry attempt (0-based): retryMin doubling
// up to retryMax, the upper half of it at random so replicas spread out.
func retryDelay(attempt int) time.Duration {
	d := retryMax
	if attempt < 16 {
		d = min(retryMin<<attempt, retryMax)
	}
	return d/2 + rand.N(d/2+1)
}

// sleep waits for d and reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
