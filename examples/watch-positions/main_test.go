package main

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/test/testserver"
)

// TestAgainstDev runs the example as its README line says, against
// `fleetbroker dev`, for both demo credentials.
func TestAgainstDev(t *testing.T) {
	dev := testserver.Dev(t)
	for _, credential := range []string{"wialon-demo", "fleetup-demo"} {
		t.Run(credential, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var out strings.Builder
			cfg := config{credentialsAddr: dev.Addr, gatewayAddr: dev.Addr, tenant: "demo", credential: credential, units: 3, updates: 2, interval: time.Second}
			if err := run(ctx, cfg, &out); err != nil {
				t.Fatalf("run: %v\noutput:\n%s", err, out.String())
			}
			if n := strings.Count(out.String(), "unit "); n != 3 {
				t.Errorf("listed %d units, want 3:\n%s", n, out.String())
			}
			if !regexp.MustCompile(`(?m)^position \S+ \S+ -?\d+\.\d+,-?\d+\.\d+ \d+ km/h$`).MatchString(out.String()) {
				t.Errorf("no position line:\n%s", out.String())
			}
		})
	}
}
