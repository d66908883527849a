package authz

import (
	"context"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// ActionUpstreamLogin is the audit action of an upstream login or token
// mint made on behalf of a session.
const ActionUpstreamLogin = "upstream.login"

// AuditedMint wraps a function that logs in upstream (a Wialon token/login, a
// FleetUp POST /token) for the session of the call in its context: an intent
// record is made durable before mint runs — if it cannot be, mint does not
// run and the call is refused with UNAVAILABLE — and the outcome is written
// after (durable with the next group commit, not waited for). The records name the session, tenant, credential and provider,
// never the secret or the token. Outside a call the Authorizer let through
// (tests that build a service without one), mint runs unaudited.
func AuditedMint[F ~func(context.Context) (string, time.Duration, error)](provider string, mint F) F {
	return func(ctx context.Context) (string, time.Duration, error) {
		a, call := callFrom(ctx)
		if a == nil {
			return mint(ctx)
		}
		ev := audit.Event{Action: ActionUpstreamLogin, Provider: provider,
			Principal: call.Principal, Via: call.Via, Peer: call.Peer, Method: call.Method,
			TenantID: call.TenantID, CredentialID: call.CredentialID, SessionID: call.SessionID}
		if err := a.intent(ctx, &ev); err != nil {
			return "", 0, err
		}
		token, ttl, err := mint(ctx)
		rec := ev
		rec.Phase = audit.PhaseOutcome
		rec.RequestID = requestid.FromContext(ctx)
		rec.Result, rec.Code, rec.Reason = result(err)
		if err != nil && rec.Reason == "" {
			rec.Reason = "upstream login failed" // the error itself may name hosts; the log has it
		}
		if rerr := a.cfg.Audit.Append(ctx, rec); rerr != nil {
			a.cfg.Logger.ErrorContext(ctx, "audit outcome of upstream login not written", "error", rerr, "provider", provider)
		}
		return token, ttl, err
	}
}
