// Package authz decides who may call what: it identifies the caller (mTLS
// client certificate, API key, or a header set by a trusted proxy), checks
// the policy for the action a method needs on the request's tenant, answers
// PERMISSION_DENIED with a stable reason otherwise, and writes one audit
// event per call. It never logs or records a secret, handle, JWT or API key.
package authz

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// APIKeyHeader is the metadata key of a caller's API key.
const APIKeyHeader = "x-api-key"

// Config says how callers are identified and which methods need what.
type Config struct {
	Policy policy.Source
	Audit  *audit.Logger
	Logger *slog.Logger
	// Actions maps full method names ("/pkg.Service/Method") to the action
	// they need. Methods not listed need only an identified caller, and
	// are not audited (the gateway's reads are authorized by handle).
	Actions map[string]policy.Action
	// RequirePrincipal refuses callers without an identity (UNAUTHENTICATED).
	RequirePrincipal bool
	// TrustedHeader is metadata carrying the caller's principal as set by a
	// proxy (e.g. a mesh sidecar that terminated mTLS). It is believed only
	// from peers in TrustedProxies.
	TrustedHeader  string
	TrustedProxies []netip.Prefix
	// Anonymous is the principal of a caller with no identity when
	// RequirePrincipal is false (dev: "dev").
	Anonymous string
}

// Authorizer is the interceptor pair and the per-handler checks.
type Authorizer struct {
	cfg Config
}

// New returns an Authorizer.
func New(cfg Config) *Authorizer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Audit == nil {
		cfg.Audit = audit.Discard()
	}
	if cfg.Anonymous == "" {
		cfg.Anonymous = "anonymous"
	}
	return &Authorizer{cfg: cfg}
}

// exempt are methods reachable without a principal: health and reflection.
func exempt(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}

// identify finds the caller's principal: a verified client certificate
// first, then an API key, then a trusted proxy's header.
func (a *Authorizer) identify(ctx context.Context) (authn.Principal, error) {
	if p, ok := authn.FromPeer(ctx); ok {
		return p, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if keys := md.Get(APIKeyHeader); len(keys) > 0 {
		if name, ok := a.cfg.Policy.Current().PrincipalForAPIKey(keys[0]); ok && len(keys) == 1 {
			return authn.Principal{Name: name, Via: "api-key"}, nil
		}
		return authn.Principal{}, apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "unknown API key", nil)
	}
	if a.cfg.TrustedHeader != "" && a.fromTrustedProxy(ctx) {
		if v := md.Get(a.cfg.TrustedHeader); len(v) == 1 && v[0] != "" && len(v[0]) <= 512 {
			return authn.Principal{Name: v[0], Via: "header"}, nil
		}
	}
	if a.cfg.RequirePrincipal {
		return authn.Principal{}, apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated,
			"no caller identity: present a client certificate or an "+APIKeyHeader, nil)
	}
	return authn.Principal{Name: a.cfg.Anonymous, Via: "none"}, nil
}

func (a *Authorizer) fromTrustedProxy(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return false
	}
	host, _, err := net.SplitHostPort(p.Addr.String())
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	for _, prefix := range a.cfg.TrustedProxies {
		if prefix.Contains(ip.Unmap()) {
			return true
		}
	}
	return false
}

// tenantOf returns the tenant a request names, if its message has one.
func tenantOf(req any) string {
	if r, ok := req.(interface{ GetTenantId() string }); ok {
		return r.GetTenantId()
	}
	return ""
}

// UnaryServerInterceptor identifies the caller, authorizes the method and
// records the audit event once the handler is done.
func (a *Authorizer) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if exempt(info.FullMethod) {
			return handler(ctx, req)
		}
		ctx, ev, err := a.begin(ctx, info.FullMethod, tenantOf(req))
		if err != nil {
			return nil, err
		}
		if r, ok := req.(interface{ GetCredentialId() string }); ok && ev != nil {
			ev.CredentialID = r.GetCredentialId()
		}
		resp, err := handler(ctx, req)
		if ev != nil {
			if r, ok := resp.(interface{ GetSessionId() string }); ok && ev.SessionID == "" {
				ev.SessionID = r.GetSessionId()
			}
			a.finish(ctx, ev, err)
		}
		return resp, err
	}
}

// StreamServerInterceptor identifies the caller of a stream.
func (a *Authorizer) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if exempt(info.FullMethod) {
			return handler(srv, ss)
		}
		ctx, ev, err := a.begin(ss.Context(), info.FullMethod, "")
		if err != nil {
			return err
		}
		err = handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx})
		if ev != nil {
			a.finish(ctx, ev, err)
		}
		return err
	}
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *wrappedStream) Context() context.Context { return s.ctx }

// begin identifies the caller and checks the method's action. For methods
// with an action it returns the audit event the handler may fill in.
func (a *Authorizer) begin(ctx context.Context, method, tenant string) (context.Context, *audit.Event, error) {
	principal, err := a.identify(ctx)
	if err != nil {
		a.record(ctx, &audit.Event{Method: method, TenantID: tenant}, err)
		return ctx, nil, err
	}
	ctx = authn.NewContext(ctx, principal)
	action, ok := a.cfg.Actions[method]
	if !ok {
		return ctx, nil, nil
	}
	ev := &audit.Event{Principal: principal.Name, Method: method, Action: string(action), TenantID: tenant}
	ctx = context.WithValue(ctx, eventKey{}, ev)
	pol := a.cfg.Policy.Current()
	allowed := pol.AllowedAnyTenant(principal.Name, action)
	if tenant != "" {
		allowed = pol.Allowed(principal.Name, action, tenant)
	}
	if !allowed {
		err := a.deny(ctx, principal, action, tenant, method)
		a.finish(ctx, ev, err)
		return ctx, nil, err
	}
	return ctx, ev, nil
}

// Require checks, inside a handler, that the caller may do action on tenant
// (for requests that name no tenant, such as RevokeSession, once the
// handler has looked the tenant up). It also records the tenant in the
// call's audit event.
func (a *Authorizer) Require(ctx context.Context, action policy.Action, tenant string) error {
	if ev := eventFrom(ctx); ev != nil && ev.TenantID == "" {
		ev.TenantID = tenant
	}
	principal, ok := authn.FromContext(ctx)
	if !ok {
		return apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "no caller identity", nil)
	}
	if a.cfg.Policy.Current().Allowed(principal.Name, action, tenant) {
		return nil
	}
	method, _ := grpc.Method(ctx)
	return a.deny(ctx, principal, action, tenant, method)
}

// GrantableScopes returns the session scopes the caller may grant on tenant.
func (a *Authorizer) GrantableScopes(ctx context.Context, tenant string) []string {
	principal, ok := authn.FromContext(ctx)
	if !ok {
		return nil
	}
	return a.cfg.Policy.Current().GrantableScopes(principal.Name, tenant)
}

func (a *Authorizer) deny(ctx context.Context, p authn.Principal, action policy.Action, tenant, method string) error {
	a.cfg.Logger.WarnContext(ctx, "permission denied", "principal", p.Name, "via", p.Via, "action", string(action), "tenant_id", tenant, "method", method)
	msg := "principal " + p.Name + " may not " + string(action)
	if tenant != "" {
		msg += " for tenant " + tenant
	}
	return apierr.New(codes.PermissionDenied, apierr.ReasonPermissionDenied, msg, map[string]string{"action": string(action), "tenant_id": tenant})
}

// finish records the call's audit event with its outcome.
func (a *Authorizer) finish(ctx context.Context, ev *audit.Event, err error) {
	a.record(ctx, ev, err)
}

func (a *Authorizer) record(ctx context.Context, ev *audit.Event, err error) {
	ev.RequestID = requestid.FromContext(ctx)
	st := status.Convert(err)
	ev.Code = st.Code().String()
	switch {
	case err == nil:
		ev.Result = "ok"
	case st.Code() == codes.PermissionDenied || st.Code() == codes.Unauthenticated:
		ev.Result = "denied"
	default:
		ev.Result = "error"
	}
	ev.Reason = apierr.Reason(err)
	if rerr := a.cfg.Audit.Record(ctx, *ev); rerr != nil {
		a.cfg.Logger.ErrorContext(ctx, "audit event not written", "error", rerr, "method", ev.Method)
	}
}

type eventKey struct{}

func eventFrom(ctx context.Context) *audit.Event {
	ev, _ := ctx.Value(eventKey{}).(*audit.Event)
	return ev
}

// SetSubject records in the call's audit event what the call acted on,
// for handlers that learn it only from the store (RevokeSession, Resolve*).
// Empty arguments leave the field as it is.
func SetSubject(ctx context.Context, tenantID, credentialID, sessionID string) {
	ev := eventFrom(ctx)
	if ev == nil {
		return
	}
	for dst, v := range map[*string]string{&ev.TenantID: tenantID, &ev.CredentialID: credentialID, &ev.SessionID: sessionID} {
		if v != "" {
			*dst = v
		}
	}
}
