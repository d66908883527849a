package security_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// TestRawPassThroughCannotMintWialonCredentials is issue 9, finding 2 (the
// Wialon half), as an attacker holding a raw-scoped handle meets it: the
// services that mint credentials or sessions — token/list (which lists the
// token strings), token/update, core/duplicate, core/create_auth_hash —
// must not run, neither on their own nor wrapped in core/batch, and
// nothing that opens the account may come back. Writes are refused too:
// the pass-through is an allow-list of read-only services.
func TestRawPassThroughCannotMintWialonCredentials(t *testing.T) {
	s := Start(t, Options{})
	gw := telematicsv1.NewTelematicsServiceClient(s.Dial(t, s.GatewayAddr, Identity{URI: "spiffe://example.org/ns/acme/sa/dashboard"}))
	raw := s.Issue(t, TenantAcme, CredWialon, 0, credentialsv1.Scope_SCOPE_READ, credentialsv1.Scope_SCOPE_RAW)
	call := func(ctx context.Context, svc string, params map[string]any) (*telematicsv1.CallProviderResponse, error) {
		return gw.CallProvider(WithHandle(ctx, raw.GetHandle()), &telematicsv1.CallProviderRequest{Call: &telematicsv1.CallProviderRequest_Wialon{
			Wialon: &telematicsv1.WialonCall{Svc: svc, Params: mustStruct(t, params)}}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A read first, so the shared session exists and is counted.
	if _, err := call(ctx, "core/search_items", map[string]any{"spec": map[string]any{"itemsType": "avl_unit"}, "flags": 1}); err != nil {
		t.Fatalf("an allowed read: %v", err)
	}
	before := s.Sim.Stats()

	item := func(svc string, params map[string]any) map[string]any {
		return map[string]any{"svc": svc, "params": params}
	}
	minting := []any{
		item("token/list", map[string]any{}),
		item("token/update", map[string]any{"callMode": "create", "h": "", "app": "x", "at": 0, "dur": 0, "fl": -1, "p": "{}", "items": []any{}}),
		item("core/duplicate", map[string]any{}),
		item("core/create_auth_hash", map[string]any{}),
	}
	attacks := []struct {
		name   string
		svc    string
		params map[string]any
	}{
		{"batch of minting services", "core/batch", map[string]any{"params": minting, "flags": 0}},
		{"minting service behind a read", "core/batch", map[string]any{"params": []any{
			item("core/search_items", map[string]any{"spec": map[string]any{"itemsType": "avl_unit"}, "flags": 1}),
			item("token/list", map[string]any{})}}},
		{"nested batch", "core/batch", map[string]any{"params": []any{item("core/batch", map[string]any{"params": minting})}}},
		{"token/list", "token/list", map[string]any{}},
		{"core/duplicate", "core/duplicate", map[string]any{}},
		{"core/create_auth_hash", "core/create_auth_hash", map[string]any{}},
		{"core/use_auth_hash", "core/use_auth_hash", map[string]any{"authHash": "x"}},
		{"a write", "item/update_name", map[string]any{"itemId": 10001, "name": "pwned"}},
		{"a write in a batch", "core/batch", map[string]any{"params": []any{item("item/update_name", map[string]any{"itemId": 10001, "name": "pwned"})}}},
	}
	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			resp, err := call(ctx, a.svc, a.params)
			if status.Code(err) != codes.PermissionDenied {
				t.Errorf("got %v (reply %.200q), want PERMISSION_DENIED", err, resp.GetJson())
			}
			if strings.Contains(resp.GetJson(), simulator.DemoWialonToken) || strings.Contains(resp.GetJson(), "eid") || strings.Contains(resp.GetJson(), "authHash") {
				t.Errorf("the reply opens the account: %.300q", resp.GetJson())
			}
		})
	}
	after := s.Sim.Stats()
	if after.ActiveWialonSessions != before.ActiveWialonSessions || after.WialonLogins != before.WialonLogins {
		t.Errorf("the attacks opened sessions: %d active, %d logins before; %d, %d after",
			before.ActiveWialonSessions, before.WialonLogins, after.ActiveWialonSessions, after.WialonLogins)
	}
	for _, svc := range []string{"wialon token/list", "wialon token/update", "wialon core/duplicate", "wialon core/create_auth_hash", "wialon item/update_name"} {
		if n := after.Requests[svc]; n != 0 {
			t.Errorf("%s reached Wialon %d times", svc, n)
		}
	}
	if n := after.Requests["wialon core/batch"] - before.Requests["wialon core/batch"]; n != 0 {
		t.Errorf("%d refused batches reached Wialon", n)
	}
	s.AssertNoLeak(t, simulator.DemoWialonToken, raw.GetHandle())
}
