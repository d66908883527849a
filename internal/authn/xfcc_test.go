package authn_test

import (
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/authn"
)

func TestFromXFCC(t *testing.T) {
	const billing = "spiffe://cluster.local/ns/billing/sa/api"
	for _, tc := range []struct {
		name, value, want string
		ok                bool
	}{
		{"istio sidecar", `By=spiffe://cluster.local/ns/fleetbroker/sa/credentials;Hash=3a0f;Subject="";URI=` + billing, billing, true},
		{"quoted subject with separators", `By=spiffe://x/y;Hash=ab;Subject="CN=a,O=b;c";URI=` + billing, billing, true},
		{"quoted uri", `Hash=ab;URI="` + billing + `"`, billing, true},
		// A client that sends its own XFCC gets an element appended after
		// it by the sidecar: only the last element counts.
		{"forged element before the sidecar's", `URI=spiffe://cluster.local/ns/fleetbroker/sa/gateway,By=spiffe://x/y;URI=` + billing, billing, true},
		{"last element without URI", `URI=spiffe://cluster.local/ns/fleetbroker/sa/gateway,By=spiffe://x/y;Hash=ab`, "", false},
		{"two URIs in one element", `URI=` + billing + `;URI=spiffe://cluster.local/ns/fleetbroker/sa/gateway`, "", false},
		{"DNS only", `By=spiffe://x/y;DNS=billing.example.org`, "", false},
		{"URI not in URI form", `URI=billing-batch`, "", false},
		{"unterminated quote", `URI="` + billing, "", false},
		{"empty", ``, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := authn.FromXFCC(tc.value)
			if got != tc.want || ok != tc.ok {
				t.Errorf("FromXFCC(%q) = %q, %v; want %q, %v", tc.value, got, ok, tc.want, tc.ok)
			}
		})
	}
}
