package requestid_test

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

func TestUnaryRequestIDHeaderOrTrailer(t *testing.T) {
	srv := grpc.NewServer(grpc.UnaryInterceptor(requestid.UnaryServerInterceptor()))
	healthpb.RegisterHealthServer(srv, health.NewServer()) // "" is SERVING, anything else NOT_FOUND
	lis := bufconn.Listen(1 << 16)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := healthpb.NewHealthClient(conn)

	for _, tc := range []struct {
		name      string
		service   string
		wantError bool
	}{
		{"success: header", "", false},
		// A failure must stay trailers-only (no header frame), or a gRPC
		// retry policy or a mesh proxy treats the call as committed.
		{"failure: trailer only", "no-such-service", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var header, trailer metadata.MD
			ctx := metadata.AppendToOutgoingContext(context.Background(), requestid.Header, "req-123")
			_, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: tc.service}, grpc.Header(&header), grpc.Trailer(&trailer))
			if (err != nil) != tc.wantError {
				t.Fatalf("Check(%q) error = %v, want error %v", tc.service, err, tc.wantError)
			}
			got, other := header, trailer
			if tc.wantError {
				got, other = trailer, header
			}
			if v := got.Get(requestid.Header); len(v) != 1 || v[0] != "req-123" {
				t.Errorf("request id = %v, want [req-123] (header %v, trailer %v)", v, header, trailer)
			}
			if v := other.Get(requestid.Header); len(v) != 0 {
				t.Errorf("request id also in the other metadata: %v", v)
			}
			if tc.wantError && len(header) != 0 {
				t.Errorf("failed call sent a header frame %v; want trailers-only", header)
			}
		})
	}
}
