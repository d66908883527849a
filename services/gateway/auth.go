package gateway

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
)

// SessionMethods are the gateway's methods: each is authorized by the
// caller's session handle (authorize), not by a policy grant. The
// authorization interceptor refuses any method in neither this list nor a
// policy action map, so a new RPC must be added here (or there).
var SessionMethods = []string{
	telematicsv1.TelematicsService_ListUnits_FullMethodName,
	telematicsv1.TelematicsService_GetLatestPositions_FullMethodName,
	telematicsv1.TelematicsService_GetPositionHistory_FullMethodName,
	telematicsv1.TelematicsService_ListTrips_FullMethodName,
	telematicsv1.TelematicsService_WatchPositions_FullMethodName,
	telematicsv1.TelematicsService_CallProvider_FullMethodName,
}

// handleFromContext reads the caller's handle from the metadata
// `authorization: Bearer <handle>`.
func handleFromContext(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get("authorization")
	if len(values) != 1 {
		return "", errNoHandle
	}
	scheme, h, ok := strings.Cut(values[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(h) == "" {
		return "", errNoHandle
	}
	return strings.TrimSpace(h), nil
}

// authorize resolves the caller's handle and checks it carries scope.
func (s *Service) authorize(ctx context.Context, scope credentialsv1.Scope) (*session, error) {
	h, err := handleFromContext(ctx)
	if err != nil {
		return nil, err
	}
	sess, err := s.resolver.resolve(ctx, h)
	if err != nil {
		return nil, s.toStatus(ctx, "resolve session", err)
	}
	authz.SetSubject(ctx, sess.tenantID, sess.credentialID, sess.sessionID)
	if s.cfg.TenantLimit != nil {
		if err := s.cfg.TenantLimit(ctx, sess.tenantID); err != nil {
			return nil, err
		}
	}
	if !sess.hasScope(scope) {
		return nil, apierr.New(codes.PermissionDenied, apierr.ReasonScopeMissing,
			"this session lacks "+scope.String()+"; issue one with that scope", map[string]string{"session_id": sess.sessionID})
	}
	return sess, nil
}
