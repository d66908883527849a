package security_test

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestFleetUpBudgetsAreNotKeyedByTypedAccounts is issue 9's finding 7: the
// FleetUp rate budget was keyed by the account id a caller typed, before
// anything proved it, so one tenant storing a bogus key with another
// tenant's account id slowed that tenant's calls. Globex stores a FleetUp
// credential naming acme's account with a wrong secret and calls through it
// again and again; acme's calls must not lose a single slot to it.
func TestFleetUpBudgetsAreNotKeyedByTypedAccounts(t *testing.T) {
	const bogusSecret = "globex-bogus-secret-canary-5d1e"
	s := Start(t, Options{GatewayDeps: func(d *app.Deps) {
		// Three slots and then one an hour: any slot the attacker spends
		// from acme's budget shows as a refused acme call, with no timing.
		d.Providers = []provider.Factory{wialon.NewProvider, func(env provider.Env) provider.Provider {
			env.Tuning.AccountLimit = provider.Limit{Rate: 1, Period: time.Hour, Burst: 3}
			return fleetup.NewProvider(env)
		}}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	globex := credentialsv1.NewCredentialServiceClient(s.Dial(t, s.CredsAddr, Identity{URI: PrincipalGlobex}))
	if _, err := globex.PutCredential(ctx, &credentialsv1.PutCredentialRequest{TenantId: TenantGlobex, CredentialId: "fleetup-squat",
		SkipValidation: true, Secret: &credentialsv1.PutCredentialRequest_Fleetup{Fleetup: &credentialsv1.FleetUpSecret{
			ApiKey: simulator.DemoFleetUpAPIKey, AccountId: simulator.DemoFleetUpAccountID, Secret: bogusSecret, BaseUrl: s.SimURL}}}); err != nil {
		t.Fatal(err)
	}
	attacker := s.Issue(t, TenantGlobex, "fleetup-squat", 0)
	attackerGW := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalGlobex}))
	for range 6 {
		_, err := attackerGW.ListUnits(WithHandle(ctx, attacker.GetHandle()), &telematicsv1.ListUnitsRequest{})
		if code := status.Code(err); code != codes.FailedPrecondition && code != codes.ResourceExhausted {
			t.Fatalf("the squatting credential's call: %v, want FAILED_PRECONDITION or RESOURCE_EXHAUSTED", err)
		}
	}

	victim := s.Issue(t, TenantAcme, CredFleetUp, 0)
	victimGW := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
	if _, err := victimGW.ListUnits(WithHandle(ctx, victim.GetHandle()), &telematicsv1.ListUnitsRequest{}); err != nil {
		t.Fatalf("acme's FleetUp budget was spent by globex's unproven credential: %v", err)
	}
	s.AssertNoLeak(t, bogusSecret, simulator.DemoFleetUpSecret, simulator.DemoFleetUpAPIKey, attacker.GetHandle(), victim.GetHandle())
}

// TestFleetUpRawPassThroughIsAnAllowList is issue 9's finding 2 for FleetUp:
// CallProvider reaches only the read-only paths on the operator's list, and
// no spelling of /token, traversal or suffix trick gets past it. A refused
// call never reaches FleetUp, never mints, and leaks nothing.
func TestFleetUpRawPassThroughIsAnAllowList(t *testing.T) {
	attacks := []struct {
		method, path string
		code         codes.Code
	}{
		{"POST", "/token", codes.PermissionDenied},
		{"GET", "/token", codes.PermissionDenied},
		{"POST", "/TOKEN", codes.PermissionDenied},
		{"POST", "/Token", codes.PermissionDenied},
		{"POST", "/token.", codes.InvalidArgument},
		{"POST", "/token.json", codes.InvalidArgument},
		{"POST", "/token/", codes.InvalidArgument},
		{"POST", "/devices/../token", codes.InvalidArgument},
		{"POST", "/devices/..%2ftoken", codes.InvalidArgument},
		{"POST", "/%2e%2e/token", codes.InvalidArgument},
		{"POST", "/%74oken", codes.InvalidArgument},
		{"POST", "//token", codes.InvalidArgument},
		{"POST", "/./token", codes.InvalidArgument},
		{"POST", "/devices;/token", codes.InvalidArgument},
		{"POST", "/devices?redirect=/token", codes.InvalidArgument},
		{"POST", "http://169.254.169.254/latest", codes.InvalidArgument},
		{"POST", "//169.254.169.254/latest", codes.InvalidArgument},
		{"POST", "/devices/unlock", codes.PermissionDenied},
		{"POST", "/tripshare/share", codes.PermissionDenied},
		{"PUT", "/devices", codes.InvalidArgument},
		{"DELETE", "/devices", codes.InvalidArgument},
		{"GET", "/token?acctId=12345", codes.PermissionDenied},
	}
	t.Run("default list", func(t *testing.T) {
		s := Start(t, Options{})
		raw := s.Issue(t, TenantAcme, CredFleetUp, 0, credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		before := s.Sim.Stats()
		for _, a := range attacks {
			if err := rawCall(gw, raw.GetHandle(), a.method, a.path); status.Code(err) != a.code {
				t.Errorf("%s %s: %v, want %v", a.method, a.path, err, a.code)
			}
		}
		after := s.Sim.Stats()
		if after.FleetUpMints != before.FleetUpMints || !reflect.DeepEqual(after.Requests, before.Requests) {
			t.Errorf("refused raw calls reached FleetUp: mints %d → %d, requests %v → %v",
				before.FleetUpMints, after.FleetUpMints, before.Requests, after.Requests)
		}
		// A read on the list works, and its reply carries neither the API
		// key nor the JWT.
		resp, err := gw.CallProvider(WithHandle(context.Background(), raw.GetHandle()), &telematicsv1.CallProviderRequest{
			Call: &telematicsv1.CallProviderRequest_Fleetup{Fleetup: &telematicsv1.FleetUpCall{Method: "POST", Path: "/devices"}}})
		if err != nil || resp.GetHttpStatus() != 200 || strings.Contains(resp.GetJson(), simulator.DemoFleetUpAPIKey) || strings.Contains(resp.GetJson(), "eyJ") {
			t.Fatalf("POST /devices: %v, %v", resp, err)
		}
		s.AssertNoLeak(t, simulator.DemoFleetUpSecret, simulator.DemoFleetUpAPIKey, raw.GetHandle())
	})

	t.Run("operator's list", func(t *testing.T) {
		s := Start(t, Options{Gateway: func(c *app.GatewayConfig) { c.FleetUpRawPaths = "/devices, /alerts/summary" }})
		raw := s.Issue(t, TenantAcme, CredFleetUp, 0, credentialsv1.Scope_SCOPE_RAW)
		gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: PrincipalAcme}))
		if err := rawCall(gw, raw.GetHandle(), "POST", "/devices"); err != nil {
			t.Errorf("a listed path: %v", err)
		}
		// A documented read the operator did not list.
		if err := rawCall(gw, raw.GetHandle(), "POST", "/trips/history"); status.Code(err) != codes.PermissionDenied {
			t.Errorf("an unlisted path: %v, want PermissionDenied", err)
		}
	})

	t.Run("an operator cannot allow /token", func(t *testing.T) {
		for _, list := range []string{"/token", "/devices,/TOKEN", "/devices/../token", "/token."} {
			cfg := app.GatewayConfig{FleetUpRawPaths: list}
			if _, err := app.BuildGateway(context.Background(), cfg, app.Deps{}); err == nil || !strings.Contains(err.Error(), "--fleetup-raw-paths") {
				t.Errorf("--fleetup-raw-paths %q: %v, want refused", list, err)
			}
		}
	})
}

func rawCall(gw telematicsv1.TelematicsServiceClient, handle, method, path string) error {
	ctx, cancel := context.WithTimeout(WithHandle(context.Background(), handle), 20*time.Second)
	defer cancel()
	_, err := gw.CallProvider(ctx, &telematicsv1.CallProviderRequest{
		Call: &telematicsv1.CallProviderRequest_Fleetup{Fleetup: &telematicsv1.FleetUpCall{Method: method, Path: path}}})
	return err
}
