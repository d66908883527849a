package bench

import (
	"context"
	"net"
	"sort"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

// bareHeader names the provider a bare call is for.
const bareHeader = "x-bench-provider"

// bareServer is baseline (b): a plain grpc.Server (no interceptors) whose
// GetLatestPositions forwards to the simulator with hard-coded upstream
// credentials (a Wialon sid and a FleetUp JWT taken at start), and turns
// the reply into the same protobuf the gateway returns. No handle, no
// cache, no Redis, no limiter.
type bareServer struct {
	telematicsv1.UnimplementedTelematicsServiceServer
	wialon   *wialon.Client
	fleetup  *fleetup.Client
	simURL   string
	sid      string
	fleetAth fleetup.Auth
}

func (b *bareServer) GetLatestPositions(ctx context.Context, _ *telematicsv1.GetLatestPositionsRequest) (*telematicsv1.GetLatestPositionsResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	var out []*telematicsv1.Position
	switch v := md.Get(bareHeader); {
	case len(v) == 1 && v[0] == provWialon:
		units, err := b.wialon.SearchUnits(ctx, b.simURL, b.sid)
		if err != nil {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
		for _, u := range units {
			if p := wialonPosition(strconv.FormatInt(u.ID, 10), u.Pos); p != nil {
				out = append(out, p)
			}
		}
	case len(v) == 1 && v[0] == provFleetUp:
		locs, err := b.fleetup.LastLocations(ctx, b.fleetAth, nil)
		if err != nil {
			return nil, status.Error(codes.Unavailable, err.Error())
		}
		for _, l := range locs {
			out = append(out, fleetupPosition(l))
		}
	default:
		return nil, status.Error(codes.InvalidArgument, "missing "+bareHeader)
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

// The same conversions as services/gateway (unexported there).

func wialonPosition(unitID string, p *wialon.Position) *telematicsv1.Position {
	if p == nil {
		return nil
	}
	return &telematicsv1.Position{UnitId: unitID, Time: timestamppb.New(p.Time), Latitude: p.Lat, Longitude: p.Lon,
		AltitudeM: p.Altitude, SpeedKmh: p.Speed, CourseDeg: p.Course, Satellites: int32(p.Satellites)}
}

func fleetupPosition(l fleetup.Location) *telematicsv1.Position {
	return &telematicsv1.Position{UnitId: l.DeviceID, Time: timestamppb.New(l.Time), Latitude: l.Lat, Longitude: l.Lon,
		SpeedKmh: l.Speed, CourseDeg: l.Heading}
}
