package authz

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/services/gateway/ratelimit"
)

// RateLimits caps requests per principal and per tenant, across replicas
// (the budgets live in Redis). It is a go-grpc-middleware ratelimit.Limiter
// and must run after the Authorizer's interceptor, which puts the principal
// and tenant in the context.
type RateLimits struct {
	Limiter *ratelimit.Limiter
	// PerPrincipal and PerTenant are off when their Rate is 0.
	PerPrincipal ratelimit.Limit
	PerTenant    ratelimit.Limit
}

// Limit implements ratelimit.Limiter of go-grpc-middleware.
func (r RateLimits) Limit(ctx context.Context) error {
	if r.Limiter == nil {
		return nil
	}
	if p, ok := authn.FromContext(ctx); ok && r.PerPrincipal.Rate > 0 {
		if err := r.take(ctx, "principal:"+p.Name, r.PerPrincipal); err != nil {
			return err
		}
	}
	if ev := eventFrom(ctx); ev != nil && ev.TenantID != "" {
		return r.LimitTenant(ctx, ev.TenantID)
	}
	return nil
}

// LimitTenant takes one request of tenant's budget, for services that learn
// the tenant only inside the handler (the gateway, from the handle). Over
// the budget it answers RESOURCE_EXHAUSTED.
func (r RateLimits) LimitTenant(ctx context.Context, tenant string) error {
	if r.Limiter == nil || r.PerTenant.Rate <= 0 {
		return nil
	}
	if err := r.take(ctx, "tenant:"+tenant, r.PerTenant); err != nil {
		return apierr.Retryable(codes.ResourceExhausted, apierr.ReasonRateLimited, err.Error(), time.Second)
	}
	return nil
}

func (r RateLimits) take(ctx context.Context, account string, limit ratelimit.Limit) error {
	allowed, retryAfter, err := r.Limiter.Allow(ctx, account, limit)
	if err != nil {
		// Redis trouble must not turn into an outage of the API: fail open,
		// the upstream budgets still hold.
		return nil
	}
	if !allowed {
		return fmt.Errorf("rate limit of %s reached; retry after %s", account, retryAfter)
	}
	return nil
}
