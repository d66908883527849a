package wialon

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// Wialon's side of the authorization flow ("connect"): its login.html
// page, the token it redirects back with, and what token/list says about
// that token. The flow itself is services/credentials' (docs/connect.md).

var _ provider.Connector = (*Provider)(nil)

// Wialon access_type bits (token rights); a token never exceeds its user's.
const (
	AccessOnlineTracking   = 0x100 // view items and their properties, request reports and messages
	AccessViewData         = 0x200
	AccessEditNonSensitive = 0x400
	AccessEditSensitive    = 0x800
	AccessEditCritical     = 0x1000
	AccessCommands         = 0x2000
	// AccessFull is Wialon's -1: everything the user may do, token
	// management included.
	AccessFull = -1

	accessKnownBits = AccessOnlineTracking | AccessViewData | AccessEditNonSensitive | AccessEditSensitive | AccessEditCritical | AccessCommands
)

const (
	// DefaultClientID is the client_id Wialon shows the customer and
	// records with the token.
	DefaultClientID = "fleetbroker"
	// DefaultLoginURL is hosted Wialon's authorization page (its API is
	// upstream.DefaultWialonBaseURL). A self-hosted Wialon's page is its
	// base URL + /login.html.
	DefaultLoginURL = "https://hosting.wialon.com/login.html"
	// MaxTokenDuration is Wialon's longest finite token (100 days).
	MaxTokenDuration = 100 * 24 * time.Hour
	// tokenLen is the length of an access token (WialonSecret.token's rule).
	tokenLen = 72
)

// ParseAccessType reads an access_type as Wialon writes it: hexadecimal
// ("0x100"), decimal ("256") or -1.
func ParseAccessType(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "-1" {
		return AccessFull, nil
	}
	n, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("access type %q: not a number (e.g. 0x100, 0x300 or -1)", s)
	}
	return n, nil
}

// FormatAccessType writes t as Wialon's login.html takes it.
func FormatAccessType(t int64) string {
	if t == AccessFull {
		return "-1"
	}
	return "0x" + strconv.FormatInt(t, 16)
}

func checkAccessType(t int64, allowFull bool) error {
	switch {
	case t == AccessFull && !allowFull:
		return errors.New("access type -1 (unlimited, token management included) needs --wialon-allow-full-access")
	case t == AccessFull:
		return nil
	case t <= 0 || t&^accessKnownBits != 0:
		return fmt.Errorf("access type %#x: use a sum of 0x100, 0x200, 0x400, 0x800, 0x1000 and 0x2000, or -1", t)
	}
	return nil
}

// exceedsAccess reports whether a token with rights got has any right
// beyond asked.
func exceedsAccess(got, asked int64) bool {
	if asked == AccessFull {
		return false
	}
	return got == AccessFull || got&^asked != 0
}

// ParseRights implements provider.Connector: "" is online tracking (0x100),
// the least a read-only integration needs; -1 needs allowUnlimited.
func (p *Provider) ParseRights(rights string, allowUnlimited bool) (string, error) {
	return ParseRights(rights, allowUnlimited)
}

// ParseRights reads the rights a connect flow asks for (--wialon-access-type)
// and returns them as login.html takes them; see Provider.ParseRights.
func ParseRights(rights string, allowUnlimited bool) (string, error) {
	t := int64(AccessOnlineTracking)
	if strings.TrimSpace(rights) != "" {
		var err error
		if t, err = ParseAccessType(rights); err != nil {
			return "", err
		}
	}
	if err := checkAccessType(t, allowUnlimited); err != nil {
		return "", err
	}
	return FormatAccessType(t), nil
}

// AuthorizationURL implements provider.Connector: login.html of the
// credential's Wialon with the broker's client id, the rights, the token's
// duration and the callback; flags 0x1 adds user_name to the redirect.
func (p *Provider) AuthorizationURL(req provider.AuthorizationRequest) string {
	login := req.PageURL
	if login == "" {
		login = DefaultLoginURL
	}
	if base := strings.TrimRight(req.BaseURL, "/"); base != "" && base != upstream.DefaultWialonBaseURL {
		login = base + "/login.html"
	}
	clientID := req.ClientID
	if clientID == "" {
		clientID = DefaultClientID
	}
	rights := req.Rights
	if rights == "" {
		rights = FormatAccessType(AccessOnlineTracking)
	}
	q := url.Values{
		"client_id":       {clientID},
		"access_type":     {rights},
		"activation_time": {"0"},
		"duration":        {strconv.FormatInt(int64(req.Duration/time.Second), 10)},
		"flags":           {"0x1"}, // return user_name
		"redirect_uri":    {req.RedirectURI},
		"response_type":   {"token"},
	}
	return login + "?" + q.Encode()
}

// CallbackSecret implements provider.Connector. Wialon redirects with
// access_token (72 letters and digits) when the customer allowed access,
// and with svc_error (a Wialon error code) when not.
func (p *Provider) CallbackSecret(q url.Values) (proto.Message, error) {
	if q.Has("svc_error") {
		// Only the number: it is Wialon's error code.
		code, _ := strconv.Atoi(q.Get("svc_error"))
		return nil, fmt.Errorf("%w (wialon svc_error %d)", provider.ErrAuthorizationDenied, code)
	}
	tokens := q["access_token"]
	if len(tokens) != 1 || !wellFormedToken(tokens[0]) {
		return nil, provider.ErrNoCallbackSecret
	}
	return &credentialsv1.WialonSecret{Token: tokens[0]}, nil
}

// wellFormedToken is WialonSecret.token's rule: 72 letters and digits.
func wellFormedToken(t string) bool {
	if len(t) != tokenLen {
		return false
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// Inspect implements provider.Connector: it logs in with the token, asks
// Wialon about the token on that session (token/list: its expiry and
// rights, which only a token with token-management rights may read) and
// logs out. Only the login decides whether the token is good: a token/list
// that is refused (the normal case for a least-privilege token) or fails
// leaves expiry and rights unknown. The login is Validate's: within the
// egress IP's login budget, and a token Wialon refused is not tried again
// (loginguard.go).
func (p *Provider) Inspect(ctx context.Context, baseURL string, secret proto.Message, asked string) (provider.Grant, error) {
	w, _ := secret.(*credentialsv1.WialonSecret)
	tok := w.GetToken()
	sess, err := p.login(ctx, baseURL, secret)
	if err != nil {
		return provider.Grant{}, err
	}
	defer func() {
		// Best effort, even when ctx has ended: the session idles out anyway.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = p.client.Logout(lctx, baseURL, sess.SID)
	}()
	out := provider.Grant{User: sess.User}
	info, found, err := p.client.TokenInfo(ctx, baseURL, sess.SID, tok)
	if err != nil || !found {
		return out, nil
	}
	out.Known, out.Expires, out.Rights = true, info.ExpireTime(), FormatAccessType(info.AccessFlags)
	want, err := ParseAccessType(asked)
	if asked == "" || err != nil {
		want = AccessOnlineTracking
	}
	out.ExceedsRights = exceedsAccess(info.AccessFlags, want)
	return out, nil
}
