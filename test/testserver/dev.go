package testserver

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
)

// DevServer is a running `fleetbroker dev`.
type DevServer struct {
	// Addr serves every gRPC service; SimURL is the simulator.
	Addr   string
	SimURL string
}

// Dev runs `fleetbroker dev` (app.RunDev, exactly what the subcommand runs)
// on free loopback ports until t ends, and returns once the demo tenant's
// credentials are stored.
func Dev(t testing.TB) DevServer {
	t.Helper()
	addr, simAddr := freeAddr(t), freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- app.RunDev(ctx, app.DevConfig{Listen: addr, SimulatorListen: simAddr}, io.Discard, slog.New(slog.DiscardHandler))
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && ctx.Err() == nil {
			t.Errorf("fleetbroker dev: %v", err)
		}
	})
	waitForDemo(t, addr, done)
	return DevServer{Addr: addr, SimURL: "http://" + simAddr}
}

// waitForDemo polls until dev has seeded both demo credentials.
func waitForDemo(t testing.TB, addr string, done <-chan error) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	creds := credentialsv1.NewCredentialServiceClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err1 := creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: app.DemoTenant, CredentialId: app.DemoWialonCredential})
		_, err2 := creds.GetCredential(ctx, &credentialsv1.GetCredentialRequest{TenantId: app.DemoTenant, CredentialId: app.DemoFleetUpCredential})
		cancel()
		if err1 == nil && err2 == nil {
			return
		}
		select {
		case err := <-done:
			t.Fatalf("fleetbroker dev stopped before it was ready: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleetbroker dev not ready after 30 s: %v / %v", err1, err2)
		}
	}
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}
