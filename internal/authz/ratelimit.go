package authz

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/ratelimit"
)

// RateLimits caps requests per authenticated principal, per session handle
// and per tenant, across replicas (the budgets live in Redis). The
// Authorizer takes them after the call's rule passed and before its intent
// record, so refused callers spend nobody's budget and floods cost no sync.
//
// A caller without an identity has no principal budget: one bucket shared
// by every anonymous caller would let anyone exhaust it for everyone. The
// gateway's callers are limited by their session and their tenant instead.
type RateLimits struct {
	Limiter *ratelimit.Limiter
	// PerPrincipal, PerSession and PerTenant are off when their Rate is 0.
	PerPrincipal ratelimit.Limit
	PerSession   ratelimit.Limit
	PerTenant    ratelimit.Limit
}

// take spends one request of the principal's budget and, when the request
// names a tenant, of the tenant's.
func (r *RateLimits) take(ctx context.Context, p authn.Principal, tenant string) error {
	if r == nil || r.Limiter == nil {
		return nil
	}
	if p.Authenticated() && r.PerPrincipal.Rate > 0 {
		if err := r.spend(ctx, "principal:"+p.Name, r.PerPrincipal); err != nil {
			return err
		}
	}
	if tenant != "" {
		return r.LimitTenant(ctx, tenant)
	}
	return nil
}

// takeSession spends one request of the budget of the session behind
// handle h (named by a hash of it, never the handle).
func (r *RateLimits) takeSession(ctx context.Context, h string) error {
	if r == nil || r.Limiter == nil || r.PerSession.Rate <= 0 {
		return nil
	}
	return r.spend(ctx, sessionBucket(h), r.PerSession)
}

// LimitTenant takes one request of tenant's budget, for services that learn
// the tenant only inside the handler (the gateway, from the handle). Over
// the budget it answers RESOURCE_EXHAUSTED.
func (r *RateLimits) LimitTenant(ctx context.Context, tenant string) error {
	if r == nil || r.Limiter == nil || r.PerTenant.Rate <= 0 {
		return nil
	}
	return r.spend(ctx, "tenant:"+tenant, r.PerTenant)
}

func (r *RateLimits) spend(ctx context.Context, account string, limit ratelimit.Limit) error {
	allowed, retryAfter, err := r.Limiter.Allow(ctx, account, limit)
	if err != nil {
		// Redis trouble must not turn into an outage of the API: fail open,
		// the upstream budgets still hold.
		return nil
	}
	if !allowed {
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonRateLimited,
			fmt.Sprintf("request rate limit reached; retry after %s", retryAfter.Round(time.Millisecond)), max(retryAfter, time.Millisecond))
	}
	return nil
}
