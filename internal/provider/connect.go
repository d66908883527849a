package provider

import (
	"context"
	"errors"
	"net/url"
	"time"

	"google.golang.org/protobuf/proto"
)

// Connector is the optional part of a provider whose customers connect an
// account through the provider's own authorization page instead of copying
// a secret: the customer approves there, and the provider redirects the
// browser to the broker's callback with a new secret in the query
// (Wialon's login.html). The credentials service asserts it on the
// provider; the flow around it (one-time states, return URLs, the
// callback, audit, storing) is provider-neutral and lives there.
//
// Rights are in the provider's own notation (Wialon's access_type), kept
// as the text ParseRights returns.
type Connector interface {
	// ParseRights checks the rights an operator asks for and returns them
	// in canonical form; "" means the provider's least-privilege default.
	// Unlimited rights are refused unless allowUnlimited.
	ParseRights(rights string, allowUnlimited bool) (string, error)
	// AuthorizationURL is the provider page to send the customer's
	// browser to. It holds req.RedirectURI, a one-time bearer value.
	AuthorizationURL(req AuthorizationRequest) string
	// CallbackSecret picks the secret (without its base URL) out of the
	// query the provider redirected the browser with. The customer's
	// refusal is an error wrapping ErrAuthorizationDenied; a query without
	// exactly one well-formed secret is ErrNoCallbackSecret. Errors never
	// hold the query.
	CallbackSecret(query url.Values) (proto.Message, error)
	// Inspect validates secret as Custody.Validate does, leaving no
	// upstream session behind, and says what the provider records about
	// it where it will: its expiry and whether it may do more than asked
	// (rights as ParseRights returned them).
	Inspect(ctx context.Context, baseURL string, secret proto.Message, asked string) (Grant, error)
}

// AuthorizationRequest is what a provider's authorization page is asked.
type AuthorizationRequest struct {
	// BaseURL is the credential's upstream: the provider's default or a
	// self-hosted one, whose own page is used.
	BaseURL string
	// PageURL is the authorization page of the provider's default host
	// (an operator's setting); "" means the provider's.
	PageURL string
	// ClientID names the broker on the page; "" means the provider's
	// default.
	ClientID string
	// Rights are the rights asked for, as ParseRights returned them.
	Rights string
	// Duration is how long the secret is to work; 0 means unlimited.
	Duration time.Duration
	// RedirectURI is the broker's callback for this flow.
	RedirectURI string
}

// Grant is what a provider says about a secret its page handed over.
type Grant struct {
	// User is the upstream user name, if the provider tells it.
	User string
	// Known is set when the provider's own record of the secret was read:
	// then Expires, Rights and ExceedsRights are the provider's. Otherwise
	// only the login is known.
	Known bool
	// Expires is when the secret stops working; zero means unlimited.
	Expires time.Time
	// Rights are the secret's rights in the provider's notation, for logs.
	Rights string
	// ExceedsRights is set when the secret may do more than was asked for
	// (the customer can edit the page's URL in their browser).
	ExceedsRights bool
}

var (
	// ErrAuthorizationDenied means the customer did not grant access on
	// the provider's page.
	ErrAuthorizationDenied = errors.New("provider: the customer did not grant access")
	// ErrNoCallbackSecret means a callback without exactly one
	// well-formed secret.
	ErrNoCallbackSecret = errors.New("provider: the callback carries no well-formed secret")
)
