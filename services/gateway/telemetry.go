package gateway

import (
	"errors"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
	"github.com/fleetbroker/fleetbroker/internal/telemetry"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// InstrumentTokenCache returns opts with hooks that feed m's token cache
// metrics (fleetbroker_token_cache_lookups_total, _mints_total and
// _mint_duration_seconds, by provider and kind); hooks already in opts
// still run. Only the key's Kind reaches a label, never its tenant or
// credential. Pass the result to tokencache.New. With a nil m, opts is
// returned unchanged.
func InstrumentTokenCache(opts tokencache.Options, m *telemetry.Metrics) tokencache.Options {
	if m == nil {
		return opts
	}
	onMint, onLookup := opts.OnMint, opts.OnLookup
	opts.OnMint = func(key tokencache.Key, took time.Duration, err error) {
		m.ObserveTokenMint(key.Kind, took, err)
		if onMint != nil {
			onMint(key, took, err)
		}
	}
	opts.OnLookup = func(key tokencache.Key, hit bool) {
		m.ObserveTokenLookup(key.Kind, hit)
		if onLookup != nil {
			onLookup(key, hit)
		}
	}
	return opts
}

// observeUpstream counts a failed upstream call by what it means
// (upstream.Kind): the HTTP metrics of telemetry.InstrumentTransport cannot
// see Wialon's errors, which come with HTTP 200, nor calls refused before
// any request by the account's shared rate budget, nor logins, which the
// credentials service makes and reports as statuses. Errors that are none
// of these (the caller gave up, Redis failed) are not upstream errors and
// are not counted here.
func (s *Service) observeUpstream(provider string, err error) {
	if err == nil || s.cfg.Metrics == nil {
		return
	}
	var ue *upstream.Error
	var limited *ratelimit.LimitedError
	switch {
	case errors.As(err, &ue):
		s.cfg.Metrics.ObserveUpstreamError(provider, ue.Kind.String())
	case errors.As(err, &limited):
		s.cfg.Metrics.ObserveUpstreamError(provider, "rate_budget")
	default:
		if kind, ok := mintFailures[apierr.Reason(err)]; ok {
			s.cfg.Metrics.ObserveUpstreamError(provider, kind.String())
		}
	}
}

// mintFailures are the reasons with which the credentials service reports
// a failed upstream login (MintUpstreamSession), by what they mean.
var mintFailures = map[string]upstream.Kind{
	apierr.ReasonCredentialRejected:   upstream.KindRejected,
	apierr.ReasonUpstreamRateLimited:  upstream.KindRateLimited,
	apierr.ReasonUpstreamUnavailable:  upstream.KindUnavailable,
	apierr.ReasonUpstreamAccessDenied: upstream.KindAccessDenied,
	apierr.ReasonUpstreamNotAllowed:   upstream.KindNotAllowed,
	apierr.ReasonUpstreamRefused:      upstream.KindInternal,
}
