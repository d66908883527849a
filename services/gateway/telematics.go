package gateway

import (
	"context"
	"encoding/base64"
	"sort"

	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/provider"
)

const defaultUnitPageSize = 100

// begin authorizes the caller for scope, finds the provider of its
// credential and lets the provider refuse req before any upstream work.
func (s *Service) begin(ctx context.Context, op string, scope credentialsv1.Scope, req proto.Message) (*session, provider.Provider, error) {
	sess, err := s.authorize(ctx, scope)
	if err != nil {
		return nil, nil, err
	}
	p, err := s.providerOf(sess)
	if err != nil {
		return nil, nil, err
	}
	if err := p.Check(req); err != nil {
		return nil, nil, s.toStatus(ctx, op, err)
	}
	return sess, p, nil
}

func (s *Service) providerOf(sess *session) (provider.Provider, error) {
	p, ok := s.cfg.Providers.Lookup(sess.provider)
	if !ok {
		return nil, errUnknownProvider
	}
	return p, nil
}

// ListUnits lists the account's units, ordered by unit id, paged.
func (s *Service) ListUnits(ctx context.Context, req *telematicsv1.ListUnitsRequest) (*telematicsv1.ListUnitsResponse, error) {
	sess, _, err := s.begin(ctx, "list units", credentialsv1.Scope_SCOPE_READ, req)
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
	p, err := s.providerOf(sess)
	if err != nil {
		return nil, err
	}
	return shared(ctx, s, sess, "units", func(ctx context.Context) ([]*telematicsv1.Unit, error) {
		units, err := withUpstream(ctx, s, sess, p, p.Units)
		sort.Slice(units, func(i, j int) bool { return units[i].GetUnitId() < units[j].GetUnitId() })
		return units, err
	})
}

// GetLatestPositions returns the last position of the named units (all if none).
func (s *Service) GetLatestPositions(ctx context.Context, req *telematicsv1.GetLatestPositionsRequest) (*telematicsv1.GetLatestPositionsResponse, error) {
	sess, _, err := s.begin(ctx, "get latest positions", credentialsv1.Scope_SCOPE_READ, req)
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
	p, err := s.providerOf(sess)
	if err != nil {
		return nil, err
	}
	return shared(ctx, s, sess, "positions", func(ctx context.Context) ([]*telematicsv1.Position, error) {
		positions, err := withUpstream(ctx, s, sess, p, p.LatestPositions)
		sort.Slice(positions, func(i, j int) bool { return positions[i].GetUnitId() < positions[j].GetUnitId() })
		return positions, err
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
	sess, p, err := s.begin(ctx, "get position history", credentialsv1.Scope_SCOPE_READ, req)
	if err != nil {
		return nil, err
	}
	from, to := req.GetStartTime().AsTime(), req.GetEndTime().AsTime()
	pager, paged := p.(provider.HistoryPager)
	if !paged && req.GetPageToken() != "" {
		return nil, apierr.Field("page_token", "this provider answers the whole range at once; there is no next page")
	}
	budget, cancel := callBudget(ctx)
	defer cancel()
	page, err := withUpstream(budget, s, sess, p, func(ctx context.Context, c *provider.Conn) (provider.HistoryPage, error) {
		if paged {
			return pager.HistoryPage(ctx, c, provider.HistoryPageRequest{UnitID: req.GetUnitId(), From: from, To: to,
				PageSize: int(req.GetPageSize()), PageToken: req.GetPageToken()})
		}
		positions, err := p.History(ctx, c, req.GetUnitId(), from, to)
		return provider.HistoryPage{Positions: positions}, err
	})
	if err != nil {
		return nil, s.toStatus(ctx, "get position history", err)
	}
	return &telematicsv1.GetPositionHistoryResponse{Positions: page.Positions, NextPageToken: page.NextPageToken,
		Truncated: page.NextPageToken != ""}, nil
}

// ListTrips returns a unit's trips within a time range.
func (s *Service) ListTrips(ctx context.Context, req *telematicsv1.ListTripsRequest) (*telematicsv1.ListTripsResponse, error) {
	sess, p, err := s.begin(ctx, "list trips", credentialsv1.Scope_SCOPE_READ, req)
	if err != nil {
		return nil, err
	}
	from, to := req.GetStartTime().AsTime(), req.GetEndTime().AsTime()
	budget, cancel := callBudget(ctx)
	defer cancel()
	trips, err := withUpstream(budget, s, sess, p, func(ctx context.Context, c *provider.Conn) ([]*telematicsv1.Trip, error) {
		return p.Trips(ctx, c, req.GetUnitId(), from, to)
	})
	if err != nil {
		return nil, s.toStatus(ctx, "list trips", err)
	}
	return &telematicsv1.ListTripsResponse{Trips: trips}, nil
}

// CallProvider passes a raw request through to the session's provider and
// returns its JSON as-is. It needs SCOPE_RAW.
func (s *Service) CallProvider(ctx context.Context, req *telematicsv1.CallProviderRequest) (*telematicsv1.CallProviderResponse, error) {
	sess, p, err := s.begin(ctx, "call provider", credentialsv1.Scope_SCOPE_RAW, req)
	if err != nil {
		return nil, err
	}
	// The audit record names what the raw call asked for, never its
	// parameters or body.
	authz.SetTarget(ctx, p.Info().Name, p.RawTarget(req))
	budget, cancel := callBudget(ctx)
	defer cancel()
	resp, err := withUpstream(budget, s, sess, p, func(ctx context.Context, c *provider.Conn) (*telematicsv1.CallProviderResponse, error) {
		return p.Raw(ctx, c, req)
	})
	if err != nil {
		return nil, s.toStatus(ctx, "call provider", err)
	}
	return resp, nil
}
