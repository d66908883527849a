package credentials

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// The Wialon authorization flow ("connect"): StartWialonAuthorization binds
// a one-time state to the tenant, the credential id, the calling principal
// and a return URL, and hands back Wialon's login.html URL; Wialon sends the
// customer's browser to the broker's callback (callback.go) with the token,
// which the broker validates and stores, and the browser goes on to the
// return URL with the outcome only. The token travels from Wialon to the
// broker: the product, the browser's user and every log line never see it.
// What is Wialon's own (login.html, the token in the redirect, token/list)
// is internal/provider/wialon's, reached through provider.Connector
// (connect_provider.go).

// Flow constants.
const (
	// StateTTL is how long a started authorization may be completed.
	StateTTL = 10 * time.Minute
	// CallbackPath is the callback's path on the public URL; the state
	// follows it as the last path segment, so it comes back however Wialon
	// joins its parameters to redirect_uri.
	CallbackPath = "/wialon/callback/"
)

// Stable ErrorInfo reasons (and audit reasons) of the flow.
const (
	ReasonAuthorizationNotConfigured = "AUTHORIZATION_NOT_CONFIGURED"
	ReasonReturnURLNotAllowed        = "RETURN_URL_NOT_ALLOWED"
	ReasonStateInvalid               = "AUTHORIZATION_STATE_INVALID"
	ReasonAuthorizationDenied        = "WIALON_AUTHORIZATION_DENIED"
	ReasonTokenInvalid               = "TOKEN_INVALID"
	ReasonTokenRightsExceeded        = "TOKEN_RIGHTS_EXCEEDED"
)

// ConnectConfig configures the Wialon authorization flow.
type ConnectConfig struct {
	// Client keeps the one-time states (one key each, stored under the
	// state's SHA-256 and expiring with it).
	Client redis.UniversalClient
	// Prefix starts every key (default "fb").
	Prefix string
	// PublicURL is the callback listener's URL as browsers reach it
	// (https://connect.example.com); redirect_uri is PublicURL +
	// CallbackPath + state.
	PublicURL string
	// ClientID is Wialon's client_id (empty: the provider's default,
	// wialon.DefaultClientID).
	ClientID string
	// AccessType is the token rights asked for, as Wialon writes them
	// ("0x100", "0x300", "-1"); empty means online tracking only (0x100).
	// -1 (unlimited) needs AllowFullAccess.
	AccessType string
	// AllowFullAccess lets AccessType be -1, and lets the callback store
	// tokens whose rights exceed AccessType.
	AllowFullAccess bool
	// ReturnURLs is the allow-list of return URLs; required.
	ReturnURLs *ReturnURLs
	// LoginURL is hosted Wialon's login.html (empty: the provider's
	// default, wialon.DefaultLoginURL).
	LoginURL string
	// Audit records each callback with the principal who started the flow
	// (nil: not recorded).
	Audit *audit.Logger
	// Registerer gets the flow's metrics (nil: not registered).
	Registerer prometheus.Registerer
}

// connector is the flow's runtime state.
type connector struct {
	cfg    ConnectConfig
	public *url.URL
	// p is the provider whose accounts the flow connects; pages is its
	// provider.Connector (its authorization page, the secret in its
	// redirect, its inspection). rights are cfg.AccessType in canonical
	// form.
	p        provider.Provider
	pages    provider.Connector
	rights   string
	outcomes *prometheus.CounterVec
}

// Outcomes of a flow, the values of the metric's outcome label.
const (
	outcomeStarted      = "started"
	outcomeConnected    = "connected"
	outcomeDenied       = "denied"
	outcomeError        = "error"
	outcomeInvalidState = "invalid_state"
)

func newConnector(cfg ConnectConfig, providers *provider.Registry) (*connector, error) {
	if cfg.Client == nil {
		return nil, errors.New("wialon authorization: a Redis client is required")
	}
	cfg.Prefix = keyspace.Prefix(cfg.Prefix)
	p, pages, err := connectorOf(providers)
	if err != nil {
		return nil, fmt.Errorf("wialon authorization: %w", err)
	}
	rights, err := pages.ParseRights(cfg.AccessType, cfg.AllowFullAccess)
	if err != nil {
		return nil, fmt.Errorf("wialon authorization: --wialon-access-type: %w", err)
	}
	if cfg.ReturnURLs == nil || len(cfg.ReturnURLs.entries) == 0 {
		return nil, errors.New("wialon authorization: the return URL allow-list is empty (--authorize-return-urls)")
	}
	public, err := ParsePublicURL(cfg.PublicURL)
	if err != nil {
		return nil, err
	}
	if _, err := url.Parse(cfg.LoginURL); err != nil {
		return nil, fmt.Errorf("wialon authorization: login URL: %w", err)
	}
	c := &connector{cfg: cfg, public: public, p: p, pages: pages, rights: rights, outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "fleetbroker", Subsystem: "credentials", Name: "wialon_authorizations_total",
		Help: "Wialon authorization flows by outcome: started, connected, denied (by the customer at Wialon), error, invalid_state (unknown, expired or replayed state).",
	}, []string{"outcome"})}
	for _, o := range []string{outcomeStarted, outcomeConnected, outcomeDenied, outcomeError, outcomeInvalidState} {
		c.outcomes.WithLabelValues(o)
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(c.outcomes); err != nil {
			return nil, fmt.Errorf("wialon authorization metrics: %w", err)
		}
	}
	return c, nil
}

// ParsePublicURL checks the callback listener's URL as browsers reach it
// (--public-url): scheme://host[:port][/path], https unless on loopback.
func ParsePublicURL(raw string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimRight(raw, "/"))
	switch {
	case raw == "":
		return nil, errors.New("wialon authorization: the public URL of the callback is required (--public-url)")
	case err != nil || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return nil, fmt.Errorf("wialon authorization: public URL %q: want scheme://host[:port][/path]", raw)
	case u.Scheme != "https" && !(u.Scheme == "http" && isLoopbackHost(u.Hostname())):
		return nil, fmt.Errorf("wialon authorization: public URL %q: browsers must reach the callback over https (http only on loopback, for development)", raw)
	}
	return u, nil
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// callbackURL is the redirect_uri for state.
func (c *connector) callbackURL(state string) string {
	return c.public.String() + CallbackPath + state
}

// loginURL is the provider's authorization page the customer's browser is
// sent to.
func (c *connector) loginURL(baseURL, state, rights string, duration time.Duration) string {
	return c.pages.AuthorizationURL(provider.AuthorizationRequest{
		BaseURL: baseURL, PageURL: c.cfg.LoginURL, ClientID: c.cfg.ClientID,
		Rights: rights, Duration: duration, RedirectURI: c.callbackURL(state),
	})
}

// --- return URLs ---

// ReturnURLs is the operator's allow-list of where a finished flow may send
// the browser. An entry is scheme://host[:port][/path]: a return URL matches
// when its scheme, host and port are the entry's and its path is the
// entry's path or below it. https only, except on loopback hosts.
type ReturnURLs struct {
	entries []*url.URL
}

// Len is how many return URLs the list allows.
func (r *ReturnURLs) Len() int { return len(r.entries) }

// ParseReturnURLs parses a comma-separated allow-list.
func ParseReturnURLs(list string) (*ReturnURLs, error) {
	r := &ReturnURLs{}
	for _, raw := range strings.Split(list, ",") {
		if raw = strings.TrimSpace(raw); raw == "" {
			continue
		}
		u, err := url.Parse(raw)
		if err != nil || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || strings.Contains(raw, `\`) {
			return nil, fmt.Errorf("return URL allow-list entry %q: want scheme://host[:port][/path]", raw)
		}
		if err := checkScheme(u); err != nil {
			return nil, fmt.Errorf("return URL allow-list entry %q: %w", raw, err)
		}
		u.Path = strings.TrimRight(u.Path, "/")
		r.entries = append(r.entries, u)
	}
	return r, nil
}

func checkScheme(u *url.URL) error {
	if u.Scheme == "https" || (u.Scheme == "http" && isLoopbackHost(u.Hostname())) {
		return nil
	}
	return errors.New("the scheme must be https (http only on loopback hosts)")
}

// Check returns raw parsed if it is on the allow-list.
func (r *ReturnURLs) Check(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil || !u.IsAbs() || u.Host == "" || u.User != nil || u.Opaque != "" || strings.ContainsAny(raw, "\\\r\n\t") {
		return nil, errors.New("not an absolute URL without user information")
	}
	if err := checkScheme(u); err != nil {
		return nil, err
	}
	// The path a browser will request must be the one checked: no dot
	// segments, no doubled slashes.
	for _, p := range []string{u.EscapedPath(), u.Path} {
		if p != "" && p != "/" && path.Clean(p) != strings.TrimSuffix(p, "/") {
			return nil, errors.New("the path is not in canonical form")
		}
	}
	for _, e := range r.entries {
		if e.Scheme == u.Scheme && strings.EqualFold(e.Hostname(), u.Hostname()) && portOf(e) == portOf(u) &&
			(e.Path == "" || u.Path == e.Path || strings.HasPrefix(u.Path, e.Path+"/")) {
			return u, nil
		}
	}
	return nil, errors.New("not on the return URL allow-list (--authorize-return-urls)")
}

func portOf(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	if u.Scheme == "https" {
		return "443"
	}
	return "80"
}

// --- states ---

// authState is what a state stands for, stored as JSON under the SHA-256 of
// the state. It holds no secret.
type authState struct {
	TenantID     string `json:"tenant_id"`
	CredentialID string `json:"credential_id"`
	Principal    string `json:"principal"`
	Via          string `json:"via"`
	ReturnURL    string `json:"return_url"`
	BaseURL      string `json:"base_url"`
	Duration     int64  `json:"duration_seconds"`
	// Rights are the token rights asked for, in the provider's notation.
	Rights     string            `json:"rights"`
	Labels     map[string]string `json:"labels,omitempty"`
	CreateTime time.Time         `json:"create_time"`
	ExpireTime time.Time         `json:"expire_time"`
	// RequestID is the StartWialonAuthorization call's, to find it in the
	// audit trail.
	RequestID string `json:"request_id,omitempty"`
}

// stateBytes is the state's entropy: 256 bits, base64url without padding.
const stateBytes = 32

var errStateNotFound = errors.New("authorization state unknown, expired or already used")

func newState() (string, error) {
	b := make([]byte, stateBytes)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// wellFormedState rejects anything newState cannot have made, before
// Redis is asked.
func wellFormedState(s string) bool {
	if len(s) != base64.RawURLEncoding.EncodedLen(stateBytes) {
		return false
	}
	_, err := base64.RawURLEncoding.DecodeString(s)
	return err == nil
}

func (c *connector) stateKey(state string) string {
	sum := sha256.Sum256([]byte("fleetbroker wialon authorization state\x00" + state))
	return c.cfg.Prefix + ":authz:wialon:" + hex.EncodeToString(sum[:])
}

func (c *connector) saveState(ctx context.Context, state string, st authState, ttl time.Duration) error {
	raw, err := json.Marshal(st)
	if err != nil {
		return err
	}
	ok, err := c.cfg.Client.SetNX(ctx, c.stateKey(state), raw, ttl).Result()
	if err != nil {
		return fmt.Errorf("save authorization state: %w", err)
	}
	if !ok {
		return errors.New("save authorization state: state collision")
	}
	return nil
}

// consumeState returns what state stands for and deletes it in the same
// step (GETDEL): a state works once, on whichever replica receives it.
func (c *connector) consumeState(ctx context.Context, state string) (authState, error) {
	raw, err := c.cfg.Client.GetDel(ctx, c.stateKey(state)).Bytes()
	if errors.Is(err, redis.Nil) {
		return authState{}, errStateNotFound
	}
	if err != nil {
		return authState{}, fmt.Errorf("consume authorization state: %w", err)
	}
	var st authState
	if err := json.Unmarshal(raw, &st); err != nil {
		return authState{}, fmt.Errorf("consume authorization state: corrupt record")
	}
	return st, nil
}

// --- the RPC ---

// StartWialonAuthorization binds a one-time state to the request and the
// caller and returns Wialon's login.html URL.
func (c *credentialServer) StartWialonAuthorization(ctx context.Context, req *credentialsv1.StartWialonAuthorizationRequest) (*credentialsv1.StartWialonAuthorizationResponse, error) {
	s := c.s
	conn := s.connect
	if conn == nil {
		return nil, apierr.New(codes.FailedPrecondition, ReasonAuthorizationNotConfigured,
			"the Wialon authorization flow is not configured on this server (--public-url, --authorize-listen, --authorize-return-urls)", nil)
	}
	baseURL := orDefault(req.GetBaseUrl(), conn.p.Info().DefaultBaseURL)
	if err := s.cfg.AllowList.Check(baseURL); err != nil {
		return nil, apierr.Field("base_url", "base URL not allowed: "+err.Error())
	}
	if _, err := conn.cfg.ReturnURLs.Check(req.GetReturnUrl()); err != nil {
		return nil, apierr.Field("return_url", "return URL not allowed: "+err.Error())
	}
	duration := req.GetDuration().AsDuration()
	if duration%time.Second != 0 {
		return nil, apierr.Field("duration", "duration must be whole seconds")
	}
	principal, _ := authn.FromContext(ctx)
	state, err := newState()
	if err != nil {
		return nil, s.toStatus(ctx, "start wialon authorization", err)
	}
	now := s.cfg.Now()
	st := authState{
		TenantID: req.GetTenantId(), CredentialID: req.GetCredentialId(),
		Principal: principal.Name, Via: principal.Via,
		ReturnURL: req.GetReturnUrl(), BaseURL: baseURL,
		Duration: int64(duration / time.Second), Rights: conn.rights,
		Labels: req.GetLabels(), CreateTime: now, ExpireTime: now.Add(StateTTL),
		RequestID: requestid.FromContext(ctx),
	}
	if err := conn.saveState(ctx, state, st, StateTTL); err != nil {
		s.cfg.Logger.ErrorContext(ctx, "start wialon authorization failed", "error", err)
		return nil, apierr.Retryable(codes.Unavailable, apierr.ReasonStoreUnavailable, "credential store unavailable", 0)
	}
	conn.outcomes.WithLabelValues(outcomeStarted).Inc()
	s.cfg.Logger.InfoContext(ctx, "wialon authorization started", "tenant_id", st.TenantID, "credential_id", st.CredentialID,
		"expire_time", st.ExpireTime)
	return &credentialsv1.StartWialonAuthorizationResponse{
		AuthorizeUrl: conn.loginURL(baseURL, state, st.Rights, duration),
		ExpireTime:   timestamppb.New(st.ExpireTime),
	}, nil
}
