package fleetup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestCacheTTL: a JWT is shared until its exp minus the margin, so it is
// replaced ahead of expiry; one already inside the margin for half its
// remaining life, and at least a second.
func TestCacheTTL(t *testing.T) {
	env := provider.Env{HTTPClient: func(string) *http.Client { return nil }, Tuning: provider.Tuning{ExpiryMargin: 2 * time.Minute}}
	p := NewProvider(env).(*Provider)
	tests := []struct {
		name     string
		left     time.Duration
		min, max time.Duration
	}{
		{"an hour left", time.Hour, 58*time.Minute - time.Second, 58 * time.Minute},
		{"inside the margin", 90 * time.Second, 44 * time.Second, 45 * time.Second},
		{"nearly expired", time.Second, time.Second, time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.CacheTTL(&credentialsv1.MintUpstreamSessionResponse{ExpireTime: timestamppb.New(time.Now().Add(tt.left))})
			if got < tt.min || got > tt.max {
				t.Fatalf("CacheTTL with %v left = %v, want within [%v, %v]", tt.left, got, tt.min, tt.max)
			}
		})
	}
}

// Budgets are keyed by what a caller cannot aim at another tenant: a mint
// by tenant and credential (nothing is proven yet), calls with a minted JWT
// by the account FleetUp minted it for, on that upstream — never by the
// account id the caller typed.
func TestBudgetNames(t *testing.T) {
	sim := simulator.New(simulator.Config{Units: 1})
	sim.AddFleetUpAccount("key-a", 4242, "secret-a")
	srv := httptest.NewServer(sim.Handler())
	t.Cleanup(srv.Close)
	other := httptest.NewServer(sim.Handler())
	t.Cleanup(other.Close)
	p := NewProvider(provider.Env{HTTPClient: func(string) *http.Client { return nil }}).(*Provider)
	ctx := context.Background()
	tok, err := p.client.MintToken(ctx, srv.URL, "key-a", 4242, "secret-a")
	if err != nil {
		t.Fatal(err)
	}
	conn := func(baseURL string, typed int64, session *credentialsv1.FleetUpUpstreamSession) (*provider.Conn, *[]string) {
		var budgets []string
		c := &provider.Conn{
			Target: provider.Target{Tenant: "acme", Credential: "f1", Generation: "g", BaseURL: baseURL, Account: strconv.FormatInt(typed, 10)},
			Pace: func(_ context.Context, budget string, _ provider.Limit) error {
				budgets = append(budgets, budget)
				return nil
			},
		}
		if session != nil {
			s, err := anypb.New(session)
			if err != nil {
				t.Fatal(err)
			}
			c.Session = &credentialsv1.MintUpstreamSessionResponse{UpstreamSession: s}
		}
		return c, &budgets
	}
	upstreamOf := func(base string) string {
		sum := sha256.Sum256([]byte(base))
		return hex.EncodeToString(sum[:8])
	}

	t.Run("mint: the credential, not the typed account", func(t *testing.T) {
		c, budgets := conn(srv.URL, 999, nil)
		if err := p.BeforeMint(ctx, c); err != nil {
			t.Fatal(err)
		}
		if want := []string{"fleetup:cred:acme:f1"}; !slices.Equal(*budgets, want) {
			t.Errorf("mint paced %v, want %v", *budgets, want)
		}
	})
	t.Run("calls: the account the JWT was minted for", func(t *testing.T) {
		// The session names account 999 (what was typed); the JWT says 4242.
		c, budgets := conn(srv.URL, 999, &credentialsv1.FleetUpUpstreamSession{Jwt: tok.JWT, ApiKey: "key-a", AccountId: 999})
		if _, err := p.Units(ctx, c); err != nil {
			t.Fatal(err)
		}
		want := "fleetup:acct:" + upstreamOf(srv.URL) + ":4242"
		if !slices.Equal(*budgets, []string{want, want}) {
			t.Errorf("units paced %v, want %q twice (two requests)", *budgets, want)
		}
	})
	t.Run("another upstream is another budget", func(t *testing.T) {
		a := accountBudget(provider.Target{BaseURL: srv.URL}, &credentialsv1.FleetUpUpstreamSession{Jwt: tok.JWT})
		b := accountBudget(provider.Target{BaseURL: other.URL}, &credentialsv1.FleetUpUpstreamSession{Jwt: tok.JWT})
		if a == b {
			t.Errorf("two upstreams share the budget %q", a)
		}
	})
	t.Run("a JWT without the claim: the account the mint succeeded with", func(t *testing.T) {
		got := accountBudget(provider.Target{BaseURL: srv.URL}, &credentialsv1.FleetUpUpstreamSession{Jwt: "opaque", AccountId: 77})
		if want := "fleetup:acct:" + upstreamOf(srv.URL) + ":77"; got != want {
			t.Errorf("budget %q, want %q", got, want)
		}
		got = accountBudget(provider.Target{Tenant: "t", Credential: "c"}, &credentialsv1.FleetUpUpstreamSession{Jwt: "opaque"})
		if got != "fleetup:cred:t:c" {
			t.Errorf("no account at all: budget %q, want the credential's", got)
		}
	})
}
