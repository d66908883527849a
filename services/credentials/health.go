package credentials

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Credential health: which stored tokens are about to stop working, and how
// the stored credentials are doing, for products (EXPIRING events) and
// operators (metrics). Token expiry is recorded per credential
// (store.Credential.TokenExpireTime); the last successful use of a token,
// recorded by the keep-alive, sits beside it.

// healthMetrics are the credential metrics. Label values come from fixed
// sets: never a tenant or credential id.
type healthMetrics struct {
	credentials *prometheus.GaugeVec   // provider, validation_state
	byExpiry    *prometheus.GaugeVec   // provider, expires_in
	minDays     *prometheus.GaugeVec   // provider
	lastCheck   prometheus.Gauge       // unix seconds
	events      *prometheus.CounterVec // type
}

var (
	metricStates = []string{store.ValidationValid, store.ValidationRejected, store.ValidationNotValidated}
	// expiryBuckets are the expires_in label values, each an exclusive range.
	expiryBuckets = []struct {
		label string
		upTo  time.Duration // a token expiring within this (and not an earlier bucket)
	}{
		{"expired", 0},
		{"7d", 7 * 24 * time.Hour},
		{"30d", 30 * 24 * time.Hour},
		{"100d", 100 * 24 * time.Hour},
		{"later", time.Duration(math.MaxInt64)},
	}
	expiryNone = "none" // unlimited or unknown
)

func newHealthMetrics(reg prometheus.Registerer) (*healthMetrics, error) {
	const ns = "fleetbroker"
	m := &healthMetrics{
		credentials: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: "credentials", Name: "stored",
			Help: "Stored credentials by provider and validation state (valid, rejected, not_validated), counted every --credential-check-interval.",
		}, []string{"provider", "validation_state"}),
		byExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: "credentials", Name: "by_token_expiry",
			Help: "Stored credentials by when their token expires: expired, within 7d, 30d or 100d (exclusive ranges), later, or none (unlimited or unknown).",
		}, []string{"provider", "expires_in"}),
		minDays: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: "credentials", Name: "min_days_to_token_expiry",
			Help: "Days until the soonest token expiry among stored credentials (negative: already expired); absent when no token of the provider has a known expiry.",
		}, []string{"provider"}),
		lastCheck: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: "credentials", Name: "last_check_timestamp_seconds",
			Help: "When this replica last counted the stored credentials and checked token expiry.",
		}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "credentials", Name: "events_published_total",
			Help: "Credential events this replica published, by type.",
		}, []string{"type"}),
	}
	for _, typ := range []EventType{EventCreated, EventRotated, EventDeleted, EventRejected, EventExpiring} {
		m.events.WithLabelValues(string(typ))
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.credentials, m.byExpiry, m.minDays, m.lastCheck, m.events} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("credential metrics: %w", err)
		}
	}
	return m, nil
}

// CheckCredentials counts the stored credentials for the metrics and
// publishes an EXPIRING event for every token within the warning window
// that has not had one. Every replica runs it; a marker in Redis (one per
// credential and secret generation) makes one of them announce each token.
func (s *Service) CheckCredentials(ctx context.Context) error {
	ev := s.cfg.Events
	if ev == nil {
		return nil
	}
	now := s.cfg.Now()
	states := map[[2]string]float64{}
	expiry := map[[2]string]float64{}
	soonest := map[string]time.Time{}
	err := s.cfg.Store.ForEachCredential(ctx, func(c store.Credential) error {
		states[[2]string{c.Provider, c.ValidationState}]++
		if c.TokenExpireTime.IsZero() {
			expiry[[2]string{c.Provider, expiryNone}]++
			return nil
		}
		left := c.TokenExpireTime.Sub(now)
		for _, b := range expiryBuckets {
			if left <= b.upTo {
				expiry[[2]string{c.Provider, b.label}]++
				break
			}
		}
		if t, ok := soonest[c.Provider]; !ok || c.TokenExpireTime.Before(t) {
			soonest[c.Provider] = c.TokenExpireTime
		}
		s.warnIfExpiring(ctx, c)
		return nil
	})
	if err != nil {
		return fmt.Errorf("check credentials: %w", err)
	}
	m := ev.metrics
	for _, prov := range s.cfg.Providers.All() {
		p := prov.Info().Name
		for _, st := range metricStates {
			m.credentials.WithLabelValues(p, st).Set(states[[2]string{p, st}])
		}
		for _, b := range expiryBuckets {
			m.byExpiry.WithLabelValues(p, b.label).Set(expiry[[2]string{p, b.label}])
		}
		m.byExpiry.WithLabelValues(p, expiryNone).Set(expiry[[2]string{p, expiryNone}])
		if t, ok := soonest[p]; ok {
			m.minDays.WithLabelValues(p).Set(t.Sub(now).Hours() / 24)
		} else {
			m.minDays.DeleteLabelValues(p)
		}
	}
	m.lastCheck.Set(float64(now.Unix()))
	return nil
}

// warnIfExpiring publishes EXPIRING for rec if its token expires within the
// warning window and no replica has announced this secret's expiry yet.
func (s *Service) warnIfExpiring(ctx context.Context, rec store.Credential) {
	ev := s.cfg.Events
	if ev == nil || rec.TokenExpireTime.IsZero() {
		return
	}
	now := s.cfg.Now()
	if rec.TokenExpireTime.Sub(now) > ev.cfg.ExpiryWarning {
		return
	}
	// The marker outlives the token by 100 days, so an expired token is
	// announced again only rarely, and a new secret (generation) anew.
	ttl := max(rec.TokenExpireTime.Sub(now), 0) + 100*24*time.Hour
	key := ev.cfg.Prefix + ":{" + rec.TenantID + "}:expiry-warned:" + rec.CredentialID + ":" + rec.Generation
	first, err := ev.cfg.Client.SetNX(ctx, key, "1", ttl).Result()
	if err != nil {
		s.cfg.Logger.WarnContext(ctx, "token expiry warning not recorded", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "error", err)
		return
	}
	if first {
		s.emit(ctx, eventOf(EventExpiring, rec))
	}
}

// RunBackground runs what the service does besides answering calls until
// ctx ends: the event notifications of this replica and the periodic
// credential check (at once, then every CheckInterval). Nothing runs
// without events.
func (s *Service) RunBackground(ctx context.Context) error {
	ev := s.cfg.Events
	if ev == nil {
		<-ctx.Done()
		return nil
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ev.Run(ctx) })
	g.Go(func() error {
		t := time.NewTicker(ev.cfg.CheckInterval)
		defer t.Stop()
		for {
			if err := s.CheckCredentials(ctx); err != nil && !errors.Is(err, context.Canceled) {
				s.cfg.Logger.WarnContext(ctx, "credential check failed; retried at the next interval", "error", err)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
		}
	})
	return g.Wait()
}
