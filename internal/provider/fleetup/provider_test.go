package fleetup

import (
	"net/http"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
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
