package gateway

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
)

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
