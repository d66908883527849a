// Package authz decides who may call what. For every call it identifies the
// caller (mTLS client certificate, API key, or a header set by a trusted
// proxy), looks up the method's rule — a policy action on the request's
// tenant, or "authorized by the session handle the caller presents" — and
// refuses every method that has no rule (deny by default). It takes the
// caller's rate budgets, makes an intent record durable in the audit trail
// before the handler runs (refusing the call when it cannot), and writes
// the outcome before the reply, without waiting for its sync (the next
// group commit makes it durable: see package audit).
//
// It never logs or records a secret, handle, JWT or API key.
package authz

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/handle"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// APIKeyHeader is the metadata key of a caller's API key.
const APIKeyHeader = "x-api-key"

// ActionSession is the audit action of calls authorized by a session handle.
const ActionSession = "session"

// Rule says how callers of one method are authorized. Exactly one of Action
// and Session is set.
type Rule struct {
	// Action is the policy action the caller's principal needs on the
	// request's tenant (or, for requests that name none, on some tenant,
	// with the handler checking the real one through Require).
	Action policy.Action
	// Session: the caller presents a session handle (metadata
	// `authorization: Bearer <handle>`) and the handler authorizes the call
	// by it (the gateway's reads); no policy grant is involved. A call
	// without a well-formed handle is refused before it spends any budget.
	Session bool
}

// Rules builds the method rules of a server from the policy actions of its
// methods and the methods authorized by session handle.
func Rules(actions map[string]policy.Action, sessionMethods []string) map[string]Rule {
	out := make(map[string]Rule, len(actions)+len(sessionMethods))
	for m, a := range actions {
		out[m] = Rule{Action: a}
	}
	for _, m := range sessionMethods {
		out[m] = Rule{Session: true}
	}
	return out
}

// Config says how callers are identified and which methods need what.
type Config struct {
	Policy policy.Source
	Audit  *audit.Logger
	Logger *slog.Logger
	// Methods maps full method names ("/pkg.Service/Method") to their rule.
	// A method not listed is refused with PERMISSION_DENIED for everyone,
	// except health and reflection.
	Methods map[string]Rule
	// HandleKeys check the handles of session-authorized calls before any
	// budget is spent; nil checks their shape only.
	HandleKeys *handle.Keys
	// RequirePrincipal refuses callers without an identity (UNAUTHENTICATED)
	// on policy-authorized methods. Session-authorized methods need no
	// principal: their callers hold a handle.
	RequirePrincipal bool
	// Cert says which certificate fields may name a caller.
	Cert authn.CertOptions
	// TrustedHeader is metadata carrying the caller's principal as set by a
	// proxy (e.g. a mesh sidecar that terminated mTLS). It is believed only
	// from peers in TrustedProxies, and only in URI form (spiffe://…).
	TrustedHeader  string
	TrustedProxies []netip.Prefix
	// Limits are the callers' request budgets (nil: none).
	Limits *RateLimits
}

// Authorizer is the interceptor pair and the per-handler checks.
type Authorizer struct {
	cfg Config
}

// anonymous is the principal of a caller with no identity where none is
// required (dev, and the gateway's handle holders). It has no source
// prefix, so no policy can name it.
const anonymous = "anonymous"

// New returns an Authorizer.
func New(cfg Config) *Authorizer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Audit == nil {
		cfg.Audit = audit.Discard()
	}
	if cfg.Policy == nil {
		cfg.Policy = policy.Static(&policy.Policy{})
	}
	return &Authorizer{cfg: cfg}
}

// exempt are methods reachable without a principal and without a rule:
// health and reflection (which the server registers only when enabled).
func exempt(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}

// Unlisted returns the methods of services that have no rule and are not
// exempt, sorted: a server must have none (they are refused at run time).
func (a *Authorizer) Unlisted(services map[string]grpc.ServiceInfo) []string {
	var out []string
	for name, info := range services {
		for _, m := range info.Methods {
			full := "/" + name + "/" + m.Name
			if _, ok := a.cfg.Methods[full]; !ok && !exempt(full) {
				out = append(out, full)
			}
		}
	}
	slices.Sort(out)
	return out
}

// Rules returns a copy of the method rules.
func (a *Authorizer) Rules() map[string]Rule { return maps.Clone(a.cfg.Methods) }

// identify finds the caller's principal: a verified client certificate
// first, then an API key, then a trusted proxy's header. A verified
// certificate that names nobody (e.g. CN-only while CN principals are off)
// is refused, not passed over for a weaker identity.
func (a *Authorizer) identify(ctx context.Context) (authn.Principal, error) {
	if p, ok := authn.FromPeer(ctx, a.cfg.Cert); ok {
		return p, nil
	}
	if authn.PresentedCertificate(ctx) {
		return authn.Principal{}, apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated,
			"the client certificate names no principal: it needs one URI SAN (spiffe://…) or a DNS SAN (a CN only where CN principals are enabled)", nil)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if keys := md.Get(APIKeyHeader); len(keys) > 0 {
		if name, ok := a.cfg.Policy.Current().PrincipalForAPIKey(keys[0]); ok && len(keys) == 1 {
			return authn.Principal{Name: name, Via: authn.ViaAPIKey}, nil
		}
		return authn.Principal{}, apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "unknown API key", nil)
	}
	if a.cfg.TrustedHeader != "" && a.fromTrustedProxy(ctx) {
		if name, ok := trustedHeaderPrincipal(a.cfg.TrustedHeader, md.Get(a.cfg.TrustedHeader)); ok {
			return authn.Principal{Name: name, Via: authn.ViaHeader}, nil
		}
	}
	return authn.Principal{Name: anonymous, Via: authn.ViaNone}, nil
}

// trustedHeaderPrincipal reads the principal a trusted proxy put in header:
// from Envoy's x-forwarded-client-cert, the URI SAN of the certificate the
// proxy verified; from any other header, its one value if it is a URI.
func trustedHeaderPrincipal(header string, values []string) (string, bool) {
	if len(values) != 1 || len(values[0]) > 4096 {
		return "", false
	}
	if strings.EqualFold(header, authn.XFCCHeader) {
		return authn.FromXFCC(values[0])
	}
	if len(values[0]) > 512 || !authn.IsURIName(values[0]) {
		return "", false
	}
	return values[0], true
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

// UnaryServerInterceptor authorizes each unary call and audits it.
func (a *Authorizer) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if exempt(info.FullMethod) {
			return handler(ctx, req)
		}
		c, err := a.begin(ctx, info.FullMethod, req)
		if err != nil {
			return nil, err
		}
		resp, err := handler(c.ctx, req)
		if r, ok := resp.(interface{ GetSessionId() string }); ok && c.ev.SessionID == "" {
			c.ev.SessionID = r.GetSessionId()
		}
		a.outcome(c.ctx, c.ev, err)
		return resp, err
	}
}

// StreamServerInterceptor authorizes each stream and audits it. A stream's
// request arrives after it starts, so its rule is checked without a tenant
// (streams here are authorized by session handle).
func (a *Authorizer) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if exempt(info.FullMethod) {
			return handler(srv, ss)
		}
		c, err := a.begin(ss.Context(), info.FullMethod, nil)
		if err != nil {
			return err
		}
		err = handler(srv, &wrappedStream{ServerStream: ss, ctx: c.ctx})
		a.outcome(c.ctx, c.ev, err)
		return err
	}
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *wrappedStream) Context() context.Context { return s.ctx }

// call is an authorized call about to run: its context (principal and
// audit event inside) and its event.
type call struct {
	ctx context.Context
	ev  *audit.Event
}

// begin runs everything that decides whether a call may start, in this
// order: identity, the method's rule, the policy or the handle's presence,
// the rate budgets, and a durable intent record. A refusal is recorded (as
// an outcome) and returned; nothing of the handler runs.
func (a *Authorizer) begin(ctx context.Context, method string, req any) (call, error) {
	tenant := tenantOf(req)
	ev := &audit.Event{Method: method, TenantID: tenant, Peer: authn.PeerAddr(ctx)}
	if r, ok := req.(interface{ GetCredentialId() string }); ok {
		ev.CredentialID = r.GetCredentialId()
	}
	if ids, ok := batchItems(req); ok {
		ev.Items, ev.CredentialIDs = len(ids), joinIDs(ids)
	}
	refuse := func(err error) (call, error) {
		a.outcome(ctx, ev, err)
		return call{}, err
	}
	principal, err := a.identify(ctx)
	if err != nil {
		return refuse(err)
	}
	ev.Principal, ev.Via = principal.Name, principal.Via
	ctx = authn.NewContext(ctx, principal)
	ctx = context.WithValue(ctx, eventKey{}, callState{a: a, ev: ev})
	rule, ok := a.cfg.Methods[method]
	switch {
	case !ok:
		a.cfg.Logger.WarnContext(ctx, "call to a method without an authorization rule refused", "method", method, "principal", principal.Name)
		return refuse(apierr.New(codes.PermissionDenied, apierr.ReasonMethodNotAuthorized,
			"method "+method+" is not open to any caller", map[string]string{"method": method}))
	case rule.Session:
		ev.Action = ActionSession
		if err := a.sessionLimit(ctx); err != nil {
			return refuse(err)
		}
	default:
		ev.Action = string(rule.Action)
		if err := a.checkPolicy(ctx, principal, rule.Action, tenant, method); err != nil {
			return refuse(err)
		}
	}
	if err := a.cfg.Limits.take(ctx, principal, tenant); err != nil {
		return refuse(err)
	}
	if err := a.intent(ctx, ev); err != nil {
		return refuse(err)
	}
	return call{ctx: ctx, ev: ev}, nil
}

// checkPolicy authorizes a policy-ruled call.
func (a *Authorizer) checkPolicy(ctx context.Context, p authn.Principal, action policy.Action, tenant, method string) error {
	if !p.Authenticated() && a.cfg.RequirePrincipal {
		return apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated,
			"no caller identity: present a client certificate or an "+APIKeyHeader, nil)
	}
	pol := a.cfg.Policy.Current()
	allowed := pol.AllowedAnyTenant(p.Name, action)
	if tenant != "" {
		allowed = pol.Allowed(p.Name, action, tenant)
	}
	if !allowed {
		return a.deny(ctx, p, action, tenant, method)
	}
	return nil
}

// sessionLimit checks that a session-ruled call carries a well-formed
// handle, and takes one request of that session's budget, before the
// call spends anything shared.
func (a *Authorizer) sessionLimit(ctx context.Context) error {
	h, ok := bearerHandle(ctx)
	if !ok {
		return apierr.New(codes.Unauthenticated, apierr.ReasonUnauthenticated, "missing session handle: send metadata 'authorization: Bearer <handle>'", nil)
	}
	if !a.handleOK(h) {
		return apierr.New(codes.Unauthenticated, apierr.ReasonSessionInvalid, "session handle is invalid, expired or revoked", nil)
	}
	return a.cfg.Limits.takeSession(ctx, h)
}

// handleOK checks h with the handle keys when the authorizer has them (a
// forged handle then spends no budget at all), else its shape only.
func (a *Authorizer) handleOK(h string) bool {
	if a.cfg.HandleKeys == nil {
		return handle.WellFormed(h)
	}
	_, err := a.cfg.HandleKeys.Check(h)
	return err == nil
}

// bearerHandle reads `authorization: Bearer <handle>`; exactly one value.
func bearerHandle(ctx context.Context) (string, bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get("authorization")
	if len(values) != 1 {
		return "", false
	}
	scheme, h, ok := strings.Cut(values[0], " ")
	h = strings.TrimSpace(h)
	if !ok || !strings.EqualFold(scheme, "bearer") || h == "" {
		return "", false
	}
	return h, true
}

// sessionBucket names a handle's rate budget: a hash of the handle under a
// label of its own, so the name in Redis matches no other hash of it.
func sessionBucket(h string) string {
	sum := sha256.Sum256([]byte("fleetbroker rate budget\x00" + h))
	return "session:" + hex.EncodeToString(sum[:16])
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

// errAuditUnavailable refuses a call whose intent record could not be made
// durable: nothing of it ran.
var errAuditUnavailable = apierr.Retryable(codes.Unavailable, apierr.ReasonAuditUnavailable,
	"the audit trail cannot be written; the call was not run", time.Second)

// intent makes the call's intent record durable, or refuses the call.
func (a *Authorizer) intent(ctx context.Context, ev *audit.Event) error {
	rec := *ev
	rec.Phase = audit.PhaseIntent
	rec.RequestID = requestid.FromContext(ctx)
	if err := a.cfg.Audit.Record(ctx, rec); err != nil {
		a.cfg.Logger.ErrorContext(ctx, "audit intent not written; call refused", "error", err, "method", ev.Method)
		return errAuditUnavailable
	}
	return nil
}

// outcome records how a call ended: written before the reply, durable
// with the next group commit, not waited for — the call already ran and
// its intent is durable, so waiting would refuse nothing and only delay
// the reply. It cannot undo the call either, so a failure here is logged,
// not returned.
func (a *Authorizer) outcome(ctx context.Context, ev *audit.Event, err error) {
	rec := *ev
	rec.Phase = audit.PhaseOutcome
	rec.RequestID = requestid.FromContext(ctx)
	rec.Result, rec.Code, rec.Reason = result(err)
	if rerr := a.cfg.Audit.Append(ctx, rec); rerr != nil {
		a.cfg.Logger.ErrorContext(ctx, "audit outcome not written", "error", rerr, "method", ev.Method, "code", rec.Code)
	}
}

func result(err error) (res, code, reason string) {
	st := status.Convert(err)
	switch {
	case err == nil:
		res = audit.ResultOK
	case st.Code() == codes.PermissionDenied || st.Code() == codes.Unauthenticated:
		res = audit.ResultDenied
	default:
		res = audit.ResultError
	}
	return res, st.Code().String(), apierr.Reason(err)
}

type eventKey struct{}

// callState is what a call's context carries for the handler's hooks: the
// Authorizer that let it in and its audit event.
type callState struct {
	a  *Authorizer
	ev *audit.Event
}

func eventFrom(ctx context.Context) *audit.Event {
	_, ev := callFrom(ctx)
	return ev
}

func callFrom(ctx context.Context) (*Authorizer, *audit.Event) {
	c, _ := ctx.Value(eventKey{}).(callState)
	return c.a, c.ev
}

// SetSubject records in the call's audit event what the call acted on,
// for handlers that learn it only from the store or the handle
// (RevokeSession, Resolve*, every gateway call). Empty arguments leave the
// field as it is.
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

// SetTarget records in the call's audit event which provider a raw call
// goes to and what it asks for (a Wialon svc; a FleetUp method and path).
// Never pass parameters or bodies: they may hold secrets.
func SetTarget(ctx context.Context, provider, target string) {
	if ev := eventFrom(ctx); ev != nil {
		ev.Provider, ev.Target = provider, target
	}
}
