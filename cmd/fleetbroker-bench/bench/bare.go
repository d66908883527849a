package bench

import (
	"context"
	"net"
	"sort"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// bareHeader names the provider a bare call is for.
const bareHeader = "x-bench-provider"

// bareServer is baseline (b): a plain grpc.Server (no interceptors) whose
// GetLatestPositions forwards to the simulator with hard-coded upstream
// sessions (a Wialon sid and a FleetUp JWT taken at start) through the same
// provider code as the gateway, so it returns the same protobuf. No handle,
// no cache, no Redis, no limiter.
type bareServer struct {
	telematicsv1.UnimplementedTelematicsServiceServer
	// byName holds each provider with its hand-held session.
	byName map[string]bareUpstream
}

type bareUpstream struct {
	p    provider.Provider
	conn *provider.Conn
}

// newBareUpstream lends p a hand-held session (no pacing, no locks).
func newBareUpstream(p provider.Provider, baseURL string, session proto.Message) (bareUpstream, error) {
	packed, err := anypb.New(session)
	if err != nil {
		return bareUpstream{}, err
	}
	return bareUpstream{p: p, conn: &provider.Conn{Target: provider.Target{BaseURL: baseURL},
		Session: &credentialsv1.MintUpstreamSessionResponse{BaseUrl: baseURL, UpstreamSession: packed}}}, nil
}

func (b *bareServer) GetLatestPositions(ctx context.Context, _ *telematicsv1.GetLatestPositionsRequest) (*telematicsv1.GetLatestPositionsResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(bareHeader)
	if len(v) != 1 {
		return nil, status.Error(codes.InvalidArgument, "missing "+bareHeader)
	}
	up, ok := b.byName[v[0]]
	if !ok {
		return nil, status.Error(codes.InvalidArgument, "unknown provider in "+bareHeader)
	}
	out, err := up.p.LatestPositions(ctx, up.conn)
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GetUnitId() < out[j].GetUnitId() })
	return &telematicsv1.GetLatestPositionsResponse{Positions: out}, nil
}

// serveBare starts b on loopback TCP and returns a client for it.
func (e *env) serveBare(b *bareServer) (telematicsv1.TelematicsServiceClient, error) {
	g := grpc.NewServer()
	telematicsv1.RegisterTelematicsServiceServer(g, b)
	addr, err := e.serveOn(func(ctx context.Context, lis net.Listener) error {
		go func() { <-ctx.Done(); g.Stop() }()
		return g.Serve(lis)
	})
	if err != nil {
		return nil, err
	}
	conn, err := e.dial(addr)
	if err != nil {
		return nil, err
	}
	return telematicsv1.NewTelematicsServiceClient(conn), nil
}
