package gateway

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"sort"
	"strconv"
	"time"

	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/provider/fleetup"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

const (
	defaultUnitPageSize = 100
	// historyLoadCount caps the messages one history call loads from Wialon.
	historyLoadCount = 10000
)

// ListUnits lists the account's units, ordered by unit id, paged.
func (s *Service) ListUnits(ctx context.Context, req *telematicsv1.ListUnitsRequest) (*telematicsv1.ListUnitsResponse, error) {
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_READ)
	if err != nil {
		return nil, err
	}
	after, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, err
	}
	units, err := s.units(ctx, sess)
	if err != nil {
		return nil, s.toStatus(ctx, "list units", err)
	}
	size := int(req.GetPageSize())
	if size == 0 {
		size = defaultUnitPageSize
	}
	start := sort.Search(len(units), func(i int) bool { return units[i].GetUnitId() > after })
	end := min(start+size, len(units))
	resp := &telematicsv1.ListUnitsResponse{Units: units[start:end]}
	if end < len(units) {
		resp.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(units[end-1].GetUnitId()))
	}
	return resp, nil
}

func decodePageToken(token string) (string, error) {
	if token == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return "", apierr.Field("page_token", "invalid page token: pass next_page_token from the previous page unchanged")
	}
	return string(b), nil
}

// units fetches every unit with its last position, sorted by unit id. Equal
// concurrent requests for one credential share one upstream call.
func (s *Service) units(ctx context.Context, sess *session) ([]*telematicsv1.Unit, error) {
	return shared(ctx, s, sess, "units", func(ctx context.Context) ([]*telematicsv1.Unit, error) {
		var units []*telematicsv1.Unit
		var err error
		switch sess.provider {
		case credentialsv1.Provider_PROVIDER_WIALON:
			err = s.withWialon(ctx, sess, func(ctx context.Context, sid string) error {
				list, err := s.cfg.Wialon.SearchUnits(ctx, sess.baseURL, sid)
				for _, u := range list {
					id := strconv.FormatInt(u.ID, 10)
					units = append(units, &telematicsv1.Unit{UnitId: id, Name: u.Name, Provider: telematicsv1.Provider_PROVIDER_WIALON, LastPosition: wialonPosition(id, u.Pos)})
				}
				return err
			})
		case credentialsv1.Provider_PROVIDER_FLEETUP:
			err = s.withFleetUp(ctx, sess, func(ctx context.Context, auth fleetup.Auth) error {
				devices, err := s.cfg.FleetUp.Devices(ctx, auth)
				if err != nil {
					return err
				}
				last, err := s.fleetupLastPositions(ctx, auth, nil)
				for _, d := range devices {
					units = append(units, &telematicsv1.Unit{UnitId: d.ID, Name: d.Name, Provider: telematicsv1.Provider_PROVIDER_FLEETUP, LastPosition: last[d.ID]})
				}
				return err
			})
		default:
			err = errWrongProvider
		}
		sort.Slice(units, func(i, j int) bool { return units[i].GetUnitId() < units[j].GetUnitId() })
		return units, err
	})
}

func (s *Service) fleetupLastPositions(ctx context.Context, auth fleetup.Auth, ids []string) (map[string]*telematicsv1.Position, error) {
	locs, err := s.cfg.FleetUp.LastLocations(ctx, auth, ids)
	if err != nil {
		return nil, err
	}
	out := make(map[string]*telematicsv1.Position, len(locs))
	for _, l := range locs {
		out[l.DeviceID] = fleetupPosition(l)
	}
	return out, nil
}

// GetLatestPositions returns the last position of the named units (all if none).
func (s *Service) GetLatestPositions(ctx context.Context, req *telematicsv1.GetLatestPositionsRequest) (*telematicsv1.GetLatestPositionsResponse, error) {
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_READ)
	if err != nil {
		return nil, err
	}
	positions, err := s.latestPositions(ctx, sess)
	if err != nil {
		return nil, s.toStatus(ctx, "get latest positions", err)
	}
	return &telematicsv1.GetLatestPositionsResponse{Positions: filterPositions(positions, req.GetUnitIds())}, nil
}

// latestPositions fetches every unit's last position; equal concurrent
// requests (callers and watch polls alike) share one upstream call.
func (s *Service) latestPositions(ctx context.Context, sess *session) ([]*telematicsv1.Position, error) {
	return shared(ctx, s, sess, "positions", func(ctx context.Context) ([]*telematicsv1.Position, error) {
		var out []*telematicsv1.Position
		var err error
		switch sess.provider {
		case credentialsv1.Provider_PROVIDER_WIALON:
			err = s.withWialon(ctx, sess, func(ctx context.Context, sid string) error {
				list, err := s.cfg.Wialon.SearchUnits(ctx, sess.baseURL, sid)
				for _, u := range list {
					if p := wialonPosition(strconv.FormatInt(u.ID, 10), u.Pos); p != nil {
						out = append(out, p)
					}
				}
				return err
			})
		case credentialsv1.Provider_PROVIDER_FLEETUP:
			err = s.withFleetUp(ctx, sess, func(ctx context.Context, auth fleetup.Auth) error {
				last, err := s.fleetupLastPositions(ctx, auth, nil)
				for _, p := range last {
					out = append(out, p)
				}
				return err
			})
		default:
			err = errWrongProvider
		}
		sort.Slice(out, func(i, j int) bool { return out[i].GetUnitId() < out[j].GetUnitId() })
		return out, err
	})
}

func filterPositions(all []*telematicsv1.Position, ids []string) []*telematicsv1.Position {
	if len(ids) == 0 {
		return all
	}
	want := make(map[string]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	out := make([]*telematicsv1.Position, 0, len(ids))
	for _, p := range all {
		if want[p.GetUnitId()] {
			out = append(out, p)
		}
	}
	return out
}

// GetPositionHistory returns a unit's positions within a time range.
func (s *Service) GetPositionHistory(ctx context.Context, req *telematicsv1.GetPositionHistoryRequest) (*telematicsv1.GetPositionHistoryResponse, error) {
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_READ)
	if err != nil {
		return nil, err
	}
	from, to := req.GetStartTime().AsTime(), req.GetEndTime().AsTime()
	resp := &telematicsv1.GetPositionHistoryResponse{}
	switch sess.provider {
	case credentialsv1.Provider_PROVIDER_WIALON:
		unitID, perr := wialonUnitID(req.GetUnitId())
		if perr != nil {
			return nil, perr
		}
		err = s.withWialonLoader(ctx, sess, func(ctx context.Context, sid string) error {
			msgs, err := s.cfg.Wialon.LoadMessages(ctx, sess.baseURL, sid, unitID, from, to, historyLoadCount)
			for _, m := range msgs {
				if p := wialonPosition(req.GetUnitId(), m.Pos); p != nil {
					resp.Positions = append(resp.Positions, p)
				}
			}
			return err
		})
	case credentialsv1.Provider_PROVIDER_FLEETUP:
		err = s.withFleetUp(ctx, sess, func(ctx context.Context, auth fleetup.Auth) error {
			locs, err := s.cfg.FleetUp.GPSHistory(ctx, auth, req.GetUnitId(), from, to)
			for _, l := range locs {
				resp.Positions = append(resp.Positions, fleetupPosition(l))
			}
			return err
		})
	default:
		err = errWrongProvider
	}
	if err != nil {
		return nil, s.toStatus(ctx, "get position history", err)
	}
	return resp, nil
}

// ListTrips returns a unit's trips within a time range.
func (s *Service) ListTrips(ctx context.Context, req *telematicsv1.ListTripsRequest) (*telematicsv1.ListTripsResponse, error) {
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_READ)
	if err != nil {
		return nil, err
	}
	from, to := req.GetStartTime().AsTime(), req.GetEndTime().AsTime()
	unit := req.GetUnitId()
	resp := &telematicsv1.ListTripsResponse{}
	switch sess.provider {
	case credentialsv1.Provider_PROVIDER_WIALON:
		unitID, perr := wialonUnitID(unit)
		if perr != nil {
			return nil, perr
		}
		err = s.withWialonLoader(ctx, sess, func(ctx context.Context, sid string) error {
			trips, err := s.cfg.Wialon.Trips(ctx, sess.baseURL, sid, unitID, from, to)
			for _, t := range trips {
				resp.Trips = append(resp.Trips, newTrip(unit, tripEnd(t.From), tripEnd(t.To), t.DistanceMeters))
			}
			return err
		})
	case credentialsv1.Provider_PROVIDER_FLEETUP:
		err = s.withFleetUp(ctx, sess, func(ctx context.Context, auth fleetup.Auth) error {
			trips, err := s.cfg.FleetUp.Trips(ctx, auth, unit, from, to)
			for _, t := range trips {
				// FleetUp reports kilometres (see docs/gateway.md).
				resp.Trips = append(resp.Trips, newTrip(unit, tripEnd(t.From), tripEnd(t.To), t.Mileage*1000))
			}
			return err
		})
	default:
		err = errWrongProvider
	}
	if err != nil {
		return nil, s.toStatus(ctx, "list trips", err)
	}
	return resp, nil
}

// CallProvider passes a raw request through to the session's provider and
// returns its JSON as-is. It needs SCOPE_RAW.
func (s *Service) CallProvider(ctx context.Context, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	sess, err := s.authorize(ctx, credentialsv1.Scope_SCOPE_RAW)
	if err != nil {
		return nil, err
	}
	resp := &telematicsv1.CallProviderResponse{}
	auditRawTarget(ctx, req)
	switch call := req.GetCall().(type) {
	case *telematicsv1.CallProviderRequest_Wialon:
		params, perr := structJSON(call.Wialon.GetParams(), "wialon.params")
		if perr != nil {
			return nil, perr
		}
		if params == nil {
			params = json.RawMessage("{}")
		}
		err = s.withWialon(ctx, sess, func(ctx context.Context, sid string) error {
			reply, err := s.cfg.Wialon.Raw(ctx, sess.baseURL, sid, call.Wialon.GetSvc(), params)
			resp.HttpStatus, resp.Json = 200, string(reply)
			return err
		})
	case *telematicsv1.CallProviderRequest_Fleetup:
		body, perr := structJSON(call.Fleetup.GetBody(), "fleetup.body")
		if perr != nil {
			return nil, perr
		}
		err = s.withFleetUp(ctx, sess, func(ctx context.Context, auth fleetup.Auth) error {
			code, reply, err := s.cfg.FleetUp.Raw(ctx, auth, call.Fleetup.GetMethod(), call.Fleetup.GetPath(), body)
			resp.HttpStatus, resp.Json = int32(code), string(reply)
			return err
		})
	}
	if err != nil {
		return nil, s.toStatus(ctx, "call provider", err)
	}
	return resp, nil
}

// auditRawTarget records what a raw call asks for in its audit record: the
// provider and the Wialon svc or the FleetUp method and path, never
// parameters or bodies.
func auditRawTarget(ctx context.Context, req *telematicsv1.CallProviderRequest) {
	switch call := req.GetCall().(type) {
	case *telematicsv1.CallProviderRequest_Wialon:
		authz.SetTarget(ctx, wialonProvider, call.Wialon.GetSvc())
	case *telematicsv1.CallProviderRequest_Fleetup:
		authz.SetTarget(ctx, fleetupProvider, call.Fleetup.GetMethod()+" "+call.Fleetup.GetPath())
	}
}

// structJSON renders a Struct as the JSON the provider expects; nil stays nil.
func structJSON(m *structpb.Struct, field string) (json.RawMessage, error) {
	if m == nil {
		return nil, nil
	}
	b, err := m.MarshalJSON()
	if err != nil {
		return nil, apierr.Field(field, "not representable as JSON")
	}
	return b, nil
}

func wialonUnitID(id string) (int64, error) {
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil || n <= 0 {
		return 0, apierr.Field("unit_id", "a Wialon unit id is a positive number")
	}
	return n, nil
}

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

// tripEnd is where and when a trip started or ended; both providers'
// TripPoint types convert to it.
type tripEnd struct {
	Time     time.Time
	Lat, Lon float64
}

func newTrip(unitID string, start, end tripEnd, distanceM float64) *telematicsv1.Trip {
	return &telematicsv1.Trip{UnitId: unitID,
		StartTime: timestamppb.New(start.Time), EndTime: timestamppb.New(end.Time),
		StartPosition: start.position(unitID), EndPosition: end.position(unitID),
		DistanceM: distanceM}
}

// position is nil when the provider gave no coordinates.
func (e tripEnd) position(unitID string) *telematicsv1.Position {
	if e.Lat == 0 && e.Lon == 0 {
		return nil
	}
	return &telematicsv1.Position{UnitId: unitID, Time: timestamppb.New(e.Time), Latitude: e.Lat, Longitude: e.Lon}
}
