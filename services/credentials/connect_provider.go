package credentials

import (
	"context"
	"time"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// What the connect flow, the events and storeSecret need to know about
// providers and their secrets, in one place: everything else of them is
// provider-neutral.

// WialonTokenInfo is what Wialon says about a token at login.
type WialonTokenInfo struct {
	// User is the Wialon user name (token/login's "au").
	User string
	// Listed: token/list answered on the token's own session and listed
	// it, so ExpireTime and AccessFlags are Wialon's own record. A token
	// without token-management rights (anything short of -1) cannot call
	// token/list; then only the login is known.
	Listed      bool
	ExpireTime  time.Time // zero: unlimited
	AccessFlags int64
}

// WialonInspector is implemented by validators that can also tell a
// token's expiry and rights; the callback falls back to ValidateWialon.
type WialonInspector interface {
	InspectWialon(ctx context.Context, baseURL, token string) (WialonTokenInfo, error)
}

// inspectWialon logs in with token and reports what Wialon says about it.
func (s *Service) inspectWialon(ctx context.Context, baseURL, token string) (WialonTokenInfo, error) {
	if in, ok := s.cfg.Validator.(WialonInspector); ok {
		return in.InspectWialon(ctx, baseURL, token)
	}
	user, err := s.cfg.Validator.ValidateWialon(ctx, baseURL, token)
	return WialonTokenInfo{User: user}, err
}

// wialonSecret is the secret of a token Wialon handed the callback.
func (s *Service) wialonSecret(token, baseURL string) secret {
	return secret{provider: store.ProviderWialon, baseURL: baseURL, wialon: &credentialsv1.WialonSecret{Token: token, BaseUrl: baseURL}}
}

// accountID is the public account number stored beside sec (FleetUp's).
func (sec secret) accountID() int64 { return sec.fleetup.GetAccountId() }

// providerEnum is the API value of a stored provider name.
func (s *Service) providerEnum(name string) credentialsv1.Provider { return providerToProto(name) }
