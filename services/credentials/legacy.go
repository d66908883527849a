package credentials

import (
	"context"

	"google.golang.org/grpc/codes"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
)

// errResolveSecretRetired is ResolveSecret's answer unless the operator
// opened the compatibility window.
var errResolveSecretRetired = apierr.New(codes.Unimplemented, apierr.ReasonRetired,
	"ResolveSecret is retired: long-lived secrets never leave the credentials service; use MintUpstreamSession", nil)

// ResolveSecret is the retired RPC that handed the gateway the decrypted
// long-lived secret. It answers only while LegacyResolveSecret is set, for
// the rolling upgrade from a gateway that still calls it; every answer is
// logged as a warning. It speaks the retired contract, whose oneof knows
// Wialon and FleetUp only.
//
// Deprecated: use MintUpstreamSession.
func (c *sessionServer) ResolveSecret(ctx context.Context, req *credentialsv1.ResolveSecretRequest) (*credentialsv1.ResolveSecretResponse, error) {
	s := c.s
	if !s.cfg.LegacyResolveSecret {
		return nil, errResolveSecretRetired
	}
	sess, rec, err := s.resolve(ctx, req.GetHandle())
	if err != nil {
		return nil, err
	}
	sec, err := s.decrypt(ctx, rec)
	if err != nil {
		return nil, s.toStatus(ctx, "resolve secret", err)
	}
	resp := &credentialsv1.ResolveSecretResponse{SessionId: sess.SessionID, CredentialVersion: rec.Version}
	switch msg := sec.msg.(type) {
	case *credentialsv1.WialonSecret:
		msg.BaseUrl = rec.BaseURL
		resp.Secret = &credentialsv1.ResolveSecretResponse_Wialon{Wialon: msg}
	case *credentialsv1.FleetUpSecret:
		msg.BaseUrl = rec.BaseURL
		resp.Secret = &credentialsv1.ResolveSecretResponse_Fleetup{Fleetup: msg}
	default:
		return nil, errResolveSecretRetired
	}
	s.cfg.Logger.WarnContext(ctx, "secret handed out by the retired ResolveSecret (--legacy-resolve-secret): turn the flag off once every gateway is upgraded",
		append(logAttrsSession(sess.SessionID, sess.TenantID, sess.CredentialID), "version", rec.Version)...)
	return resp, nil
}
