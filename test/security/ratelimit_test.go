package security_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// TestAnonymousCallersShareNoBudget is finding 5: on a gateway without
// client certificates every caller used to be principal "anonymous", so
// --rate-limit-principal let anyone exhaust everyone's budget with calls
// that carry no handle. Handle-less calls are now refused before they spend
// any budget, and callers are limited by their session.
func TestAnonymousCallersShareNoBudget(t *testing.T) {
	s := Start(t, Options{Gateway: func(c *app.GatewayConfig) {
		c.Security.TLSClientCA = "" // TLS, no client certificates: every caller is anonymous
		c.Security.RateLimitPrincipal = 2
		c.Security.RateLimitSession = 3
	}})
	victim := s.Issue(t, TenantAcme, CredWialon, 0)
	flooder := s.Issue(t, TenantAcme, CredWialon, 0)
	gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{}))
	call := func(h string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if h != "" {
			ctx = WithHandle(ctx, h)
		}
		_, err := gw.ListUnits(ctx, &telematicsv1.ListUnitsRequest{})
		return err
	}
	// The attacker: many calls without a handle. Each is refused as
	// unauthenticated, never as over a budget it shares with others.
	for range 20 {
		if err := call(""); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("handle-less call: %v, want Unauthenticated", err)
		}
	}
	if err := call(victim.GetHandle()); err != nil {
		t.Fatalf("the attacker's handle-less calls spent the victim's budget: %v", err)
	}
	// A session that floods runs into its own budget, not its neighbour's.
	limited := false
	for range 20 {
		err := call(flooder.GetHandle())
		if status.Code(err) == codes.ResourceExhausted {
			limited = true
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !limited {
		t.Fatal("20 calls in a row never hit a 3/s session budget")
	}
	if err := call(victim.GetHandle()); err != nil {
		t.Fatalf("one session's flood limited another: %v", err)
	}
	s.AssertNoLeak(t, victim.GetHandle(), flooder.GetHandle())
}
