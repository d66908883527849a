package credentials

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"html/template"
	"net/http"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// The callback is the broker's only browser-facing surface. Wialon puts the
// token in its query string; nothing here ever writes the URL, the query or
// the token to a log line, an error, a metric, an audit record or a
// response. The server serving it must not log requests either (and no
// tracing middleware that records URLs may wrap it).

// CallbackAuditMethod names the callback in the audit trail (its Method).
const CallbackAuditMethod = "http:" + CallbackPath + "{state}"

// callbackTimeout bounds one callback: a Wialon login, Vault and Redis.
const callbackTimeout = 30 * time.Second

// Callback outcomes added to the return URL's query as status.
const (
	StatusConnected = "connected"
	StatusDenied    = "denied"
	StatusError     = "error"
)

// AuthorizeHandler serves the Wialon authorization callback, for its own
// listener; nil when the flow is not configured. It routes by hand rather
// than through http.ServeMux, which answers a path with dot segments by
// redirecting to the cleaned path with the query string, token included.
func (s *Service) AuthorizeHandler() http.Handler {
	if s.connect == nil {
		return nil
	}
	return browserHeaders(recoverPanics(s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		state, ok := strings.CutPrefix(r.URL.Path, CallbackPath)
		switch {
		case !ok || strings.Contains(state, "/"):
			writePage(w, http.StatusNotFound, "Not found", "There is nothing here.")
		case r.Method != http.MethodGet:
			w.Header().Set("Allow", http.MethodGet)
			writePage(w, http.StatusMethodNotAllowed, "Not allowed", "This address only takes the browser back from Wialon.")
		default:
			s.handleCallback(w, r, state)
		}
	})))
}

// browserHeaders keeps every response out of caches and Referer headers:
// the request URL holds the token, and a Referer sent from this page would
// carry it to the next site.
func browserHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		h.Set("Pragma", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'")
		next.ServeHTTP(w, r)
	})
}

// recoverPanics answers a panic with a plain error page; net/http's own
// recovery would log the request.
func recoverPanics(s *Service, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				s.cfg.Logger.Error("panic in the wialon authorization callback")
				writePage(w, http.StatusInternalServerError, "Something went wrong", "Go back to your application and try again.")
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// callbackResult is how a callback ended, for the audit trail, the log,
// the metric and the browser.
type callbackResult struct {
	status  string // StatusConnected, StatusDenied or StatusError
	code    codes.Code
	reason  string
	outcome string // the metric label
}

func (s *Service) handleCallback(w http.ResponseWriter, r *http.Request, state string) {
	conn := s.connect
	ctx, cancel := context.WithTimeout(r.Context(), callbackTimeout)
	defer cancel()
	ctx = requestid.NewContext(ctx, newCallbackID())
	ev := audit.Event{Method: CallbackAuditMethod, Action: string(policy.CredentialsWrite), Peer: r.RemoteAddr,
		Provider: conn.p.Info().Name, RequestID: requestid.FromContext(ctx)}

	rec, err := s.lookupState(ctx, state)
	switch {
	case errors.Is(err, errStateNotFound):
		conn.outcomes.WithLabelValues(outcomeInvalidState).Inc()
		s.auditOutcome(ctx, ev, callbackResult{code: codes.PermissionDenied, reason: ReasonStateInvalid})
		s.cfg.Logger.WarnContext(ctx, "wialon authorization callback with an unknown, expired or used state")
		writePage(w, http.StatusBadRequest, "This link no longer works",
			"This sign-in link is invalid, has expired or was already used. Go back to your application and connect Wialon again.")
		return
	case err != nil:
		conn.outcomes.WithLabelValues(outcomeError).Inc()
		s.auditOutcome(ctx, ev, callbackResult{code: codes.Unavailable, reason: apierr.ReasonStoreUnavailable})
		s.cfg.Logger.ErrorContext(ctx, "wialon authorization callback failed", "error", err)
		writePage(w, http.StatusServiceUnavailable, "Please try again", "The service is temporarily unavailable. Go back to your application and try again.")
		return
	}
	ev.Principal, ev.Via, ev.TenantID, ev.CredentialID = rec.Principal, rec.Via, rec.TenantID, rec.CredentialID
	ret, err := conn.cfg.ReturnURLs.Check(rec.ReturnURL)
	if err != nil {
		// The allow-list changed since the flow started: send the browser nowhere.
		conn.outcomes.WithLabelValues(outcomeError).Inc()
		s.auditOutcome(ctx, ev, callbackResult{code: codes.PermissionDenied, reason: ReasonReturnURLNotAllowed})
		s.cfg.Logger.WarnContext(ctx, "wialon authorization callback: return URL no longer allowed", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID)
		writePage(w, http.StatusBadRequest, "Connection not completed",
			"The application's return address is not allowed. Nothing was stored. Contact the application's support.")
		return
	}
	res := s.completeAuthorization(ctx, ev, rec, r.URL.Query())
	conn.outcomes.WithLabelValues(res.outcome).Inc()
	s.cfg.Logger.InfoContext(ctx, "wialon authorization callback", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID,
		"status", res.status, "reason", res.reason, "start_request_id", rec.RequestID)
	q := ret.Query()
	q.Set("status", res.status)
	q.Set("credential_id", rec.CredentialID)
	ret.RawQuery = q.Encode()
	http.Redirect(w, r, ret.String(), http.StatusSeeOther)
}

// lookupState consumes state and returns what it stands for; one that is
// malformed, unknown, used or past its expiry is errStateNotFound.
func (s *Service) lookupState(ctx context.Context, state string) (authState, error) {
	if !wellFormedState(state) {
		return authState{}, errStateNotFound
	}
	rec, err := s.connect.consumeState(ctx, state)
	if err != nil {
		return authState{}, err
	}
	if !s.cfg.Now().Before(rec.ExpireTime) {
		return authState{}, errStateNotFound
	}
	return rec, nil
}

// completeAuthorization decides and does what the callback's parameters
// ask, in the name of the principal who started the flow, with an intent
// record before anything is stored and an outcome record after.
func (s *Service) completeAuthorization(ctx context.Context, ev audit.Event, rec authState, q url.Values) callbackResult {
	// Policy may have changed in the ten minutes since the start.
	pctx := authn.NewContext(ctx, authn.Principal{Name: rec.Principal, Via: rec.Via})
	if err := s.cfg.Authorizer.Require(pctx, policy.CredentialsWrite, rec.TenantID); err != nil {
		res := callbackResult{status: StatusError, code: codes.PermissionDenied, reason: apierr.Reason(err), outcome: outcomeError}
		s.auditOutcome(ctx, ev, res)
		return res
	}
	if err := s.auditIntent(ctx, ev); err != nil {
		s.cfg.Logger.ErrorContext(ctx, "audit intent not written; wialon authorization refused", "error", err)
		return callbackResult{status: StatusError, code: codes.Unavailable, reason: apierr.ReasonAuditUnavailable, outcome: outcomeError}
	}
	res := s.storeAuthorized(pctx, rec, q)
	s.auditOutcome(ctx, ev, res)
	return res
}

// storeAuthorized validates the token Wialon sent and stores it.
func (s *Service) storeAuthorized(ctx context.Context, rec authState, q url.Values) callbackResult {
	conn := s.connect
	fail := func(code codes.Code, reason string) callbackResult {
		return callbackResult{status: StatusError, code: code, reason: reason, outcome: outcomeError}
	}
	msg, err := conn.pages.CallbackSecret(q)
	switch {
	case errors.Is(err, provider.ErrAuthorizationDenied):
		// The error holds the provider's error code only, never the query.
		s.cfg.Logger.InfoContext(ctx, "wialon authorization not granted", "tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "reason", err.Error())
		return callbackResult{status: StatusDenied, code: codes.PermissionDenied, reason: ReasonAuthorizationDenied, outcome: outcomeDenied}
	case err != nil:
		return fail(codes.InvalidArgument, ReasonTokenInvalid)
	}
	sec := secret{provider: conn.p.Info().Name, p: conn.p, baseURL: rec.BaseURL, msg: msg}
	grant, err := conn.pages.Inspect(ctx, sec.baseURL, sec.msg, rec.Rights)
	if err != nil {
		st, _ := status.FromError(s.toStatus(ctx, "wialon authorization", err))
		return fail(st.Code(), apierr.Reason(st.Err()))
	}
	if grant.Known && grant.ExceedsRights && !conn.cfg.AllowFullAccess {
		// The customer widened the rights on Wialon's page (the URL is in
		// their browser): a token able to do more than asked is not kept.
		s.cfg.Logger.WarnContext(ctx, "wialon authorization refused: the token has more rights than asked for",
			"tenant_id", rec.TenantID, "credential_id", rec.CredentialID, "asked", rec.Rights, "got", grant.Rights)
		return fail(codes.FailedPrecondition, ReasonTokenRightsExceeded)
	}
	now := s.cfg.Now()
	expire := grant.Expires
	if !grant.Known && rec.Duration > 0 {
		// Wialon starts the token's duration when the customer approves,
		// just before this callback.
		expire = now.Add(time.Duration(rec.Duration) * time.Second)
	}
	// Stored through PutCredential's own path, with the answer of the
	// login just made as its validation.
	_, err = s.put(ctx, rec.TenantID, rec.CredentialID, sec, putOptions{
		baseURLField: "base_url", labels: rec.Labels,
		validated:       &store.Validation{State: store.ValidationValid, UpstreamUser: grant.User, Time: now},
		tokenExpireTime: expire,
	})
	if err != nil {
		st, _ := status.FromError(err)
		return fail(st.Code(), apierr.Reason(st.Err()))
	}
	return callbackResult{status: StatusConnected, code: codes.OK, outcome: outcomeConnected}
}

func (s *Service) auditIntent(ctx context.Context, ev audit.Event) error {
	if s.connect.cfg.Audit == nil {
		return nil
	}
	ev.Phase = audit.PhaseIntent
	return s.connect.cfg.Audit.Record(ctx, ev)
}

func (s *Service) auditOutcome(ctx context.Context, ev audit.Event, res callbackResult) {
	if s.connect.cfg.Audit == nil {
		return
	}
	ev.Phase = audit.PhaseOutcome
	ev.Code, ev.Reason = res.code.String(), res.reason
	switch {
	case res.code == codes.OK:
		ev.Result = audit.ResultOK
	case res.code == codes.PermissionDenied || res.code == codes.Unauthenticated:
		ev.Result = audit.ResultDenied
	default:
		ev.Result = audit.ResultError
	}
	if err := s.connect.cfg.Audit.Record(ctx, ev); err != nil {
		s.cfg.Logger.ErrorContext(ctx, "audit outcome not written", "error", err, "method", ev.Method, "code", ev.Code)
	}
}

func newCallbackID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "cb-" + hex.EncodeToString(b)
}

var pageTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{.Title}}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}</style>
</head><body><h1>{{.Title}}</h1><p>{{.Text}}</p></body></html>
`))

// writePage answers with a small HTML page; its texts are constants.
func writePage(w http.ResponseWriter, code int, title, text string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	_ = pageTemplate.Execute(w, struct{ Title, Text string }{title, text})
}
