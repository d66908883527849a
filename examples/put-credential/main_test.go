package main

import (
	"context"
	"strings"
	"testing"

	"github.com/fleetbroker/fleetbroker/services/simulator"
	"github.com/fleetbroker/fleetbroker/test/testserver"
)

// TestAgainstDev stores the simulator's demo token under a new id, the way
// the README line runs it, and checks the handle stays hidden by default.
func TestAgainstDev(t *testing.T) {
	dev := testserver.Dev(t)
	for _, tc := range []struct {
		name       string
		cfg        config
		wantErr    string
		wantLines  []string
		wantHandle bool
	}{
		{"validated", config{credential: "wialon-example", baseURL: dev.SimURL, token: simulator.DemoWialonToken},
			"", []string{"credential acme/wialon-example version 1 (created true) validation VALIDATION_STATE_VALID", "session ses_"}, false},
		{"replaced, handle shown", config{credential: "wialon-example", baseURL: dev.SimURL, token: simulator.DemoWialonToken, showHandle: true},
			"", []string{"version 2 (created false)", "handle fbs_"}, true},
		{"rejected token", config{credential: "wialon-bad", baseURL: dev.SimURL, token: strings.Repeat("b", 72)},
			"Wialon rejected the token", nil, false},
		{"no token", config{credential: "wialon-none", baseURL: dev.SimURL},
			"FLEETBROKER_WIALON_TOKEN is empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.addr, tc.cfg.tenant, tc.cfg.ttl = dev.Addr, "acme", 60e9
			var out strings.Builder
			err := run(context.Background(), tc.cfg, &out)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("run = %v, want error containing %q", err, tc.wantErr)
				}
				if tc.cfg.token != "" && strings.Contains(err.Error(), tc.cfg.token) {
					t.Error("the error repeats the token")
				}
				return
			}
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			for _, want := range tc.wantLines {
				if !strings.Contains(out.String(), want) {
					t.Errorf("output lacks %q:\n%s", want, out.String())
				}
			}
			if got := strings.Contains(out.String(), "fbs_"); got != tc.wantHandle {
				t.Errorf("handle printed = %v, want %v:\n%s", got, tc.wantHandle, out.String())
			}
			if strings.Contains(out.String(), tc.cfg.token) {
				t.Error("the output repeats the token")
			}
		})
	}
}
