package security_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	"github.com/fleetbroker/fleetbroker/internal/server"
	"github.com/fleetbroker/fleetbroker/services/credentials"
	"github.com/fleetbroker/fleetbroker/services/gateway"
)

// TestEveryServedMethodHasARule is finding 11: the authorizer used to let
// any identified caller call a method that had no action mapped. It now
// refuses such methods to everyone; this test walks every method of every
// ServiceDesc the real credentials service and gateway serve and fails
// when one is in neither the policy actions (credentials.Actions) nor the
// session-authorized list (gateway.SessionMethods). A new RPC must be put
// in one of them on purpose.
func TestEveryServedMethodHasARule(t *testing.T) {
	s := Start(t, Options{NoSeed: true})
	for name, srv := range map[string]*server.Server{"credentials": s.Credentials, "gateway": s.Gateway} {
		served := 0
		for svc, info := range srv.GRPC().GetServiceInfo() {
			for _, m := range info.Methods {
				full := "/" + svc + "/" + m.Name
				_, byAction := credentials.Actions[full]
				bySession := slices.Contains(gateway.SessionMethods, full)
				exempt := strings.HasPrefix(full, "/grpc.health.v1.") || strings.HasPrefix(full, "/grpc.reflection.")
				switch {
				case exempt:
				case byAction && bySession:
					t.Errorf("%s: %s is both policy- and session-authorized", name, full)
				case !byAction && !bySession:
					t.Errorf("%s serves %s, which has no authorization rule: add it to credentials.Actions or gateway.SessionMethods", name, full)
				default:
					served++
				}
			}
		}
		if served == 0 {
			t.Errorf("%s serves no authorized method: the walk saw nothing", name)
		}
	}
	// The walk covers dev too, which serves both in one server.
	if len(credentials.Actions) == 0 || len(gateway.SessionMethods) == 0 {
		t.Fatal("empty rule lists")
	}
}

// TestDevRefusesNonLoopback is finding 12: `fleetbroker dev` serves every
// RPC to every caller without authentication, and used to accept any
// --listen. It now refuses an address other than loopback unless
// --dev-listen-anywhere is given.
func TestDevRefusesNonLoopback(t *testing.T) {
	for _, tt := range []struct {
		listen, metrics string
		anywhere        bool
		wantErr         string
	}{
		{"0.0.0.0:0", "", false, "--listen 0.0.0.0:0 is not a loopback address"},
		{":0", "", false, "--listen :0 is not a loopback address"},
		{"127.0.0.1:0", ":0", false, "--metrics-listen :0 is not a loopback address"},
		{"127.0.0.1:0", "", false, ""},
		{"0.0.0.0:0", "", true, ""},
	} {
		t.Run(tt.listen+" "+tt.metrics, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ready := make(chan struct{})
			out := &readyWriter{ready: ready}
			errc := make(chan error, 1)
			go func() {
				errc <- app.RunDev(ctx, app.DevConfig{Listen: tt.listen, SimulatorListen: "127.0.0.1:0", MetricsListen: tt.metrics,
					ListenAnywhere: tt.anywhere, FleetUpRate: 50}, out, slog.New(slog.NewTextHandler(io.Discard, nil)))
			}()
			if tt.wantErr != "" {
				err := <-errc
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "--dev-listen-anywhere") {
					t.Fatalf("RunDev = %v, want %q and how to override it", err, tt.wantErr)
				}
				return
			}
			select {
			case <-ready:
			case err := <-errc:
				t.Fatalf("RunDev = %v, want it serving", err)
			case <-time.After(60 * time.Second):
				t.Fatal("dev not ready within 60s")
			}
			cancel()
			if err := <-errc; err != nil && !errors.Is(err, context.Canceled) {
				t.Fatalf("RunDev after cancel: %v", err)
			}
		})
	}
}

// readyWriter closes ready when dev prints that it is ready.
type readyWriter struct {
	ready  chan struct{}
	closed bool
	buf    strings.Builder
}

func (w *readyWriter) Write(p []byte) (int, error) {
	w.buf.Write(p)
	if !w.closed && strings.Contains(w.buf.String(), "fleetbroker dev is ready") {
		w.closed = true
		close(w.ready)
	}
	return len(p), nil
}
