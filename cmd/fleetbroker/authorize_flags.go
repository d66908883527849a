package main

import (
	"flag"

	"github.com/fleetbroker/fleetbroker/cmd/fleetbroker/app"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/services/credentials"
)

// addAuthorizeFlags declares the flags of the Wialon authorization flow and
// of credential events (`fleetbroker credentials`).
func addAuthorizeFlags(fs *flag.FlagSet, a *app.AuthorizeConfig, e *app.EventsConfig) {
	fs.StringVar(&a.Listen, "authorize-listen", "", "listen address of the Wialon authorization callback (HTTPS; the only browser-facing port: expose it through its own ingress route); empty turns StartWialonAuthorization off")
	fs.StringVar(&a.PublicURL, "public-url", "", "the callback listener's URL as browsers reach it, e.g. https://connect.example.com (Wialon redirects to <public-url>"+credentials.CallbackPath+"<state>)")
	fs.StringVar(&a.ReturnURLs, "authorize-return-urls", "", "comma-separated allow-list of return URLs, scheme://host[:port][/path]: a finished flow sends the browser only to a URL at or below one of them (https, or http on loopback)")
	fs.StringVar(&a.TLSCert, "authorize-tls-cert", "", "certificate (PEM) of the callback listener; default --tls-cert (re-read when the file changes)")
	fs.StringVar(&a.TLSKey, "authorize-tls-key", "", "private key (PEM) of the callback listener; default --tls-key")
	fs.StringVar(&a.ClientID, "wialon-client-id", wialon.DefaultClientID, "client_id shown to the customer on Wialon's authorization page and recorded with the token")
	fs.StringVar(&a.AccessType, "wialon-access-type", app.DefaultWialonAccessType, "token rights asked of Wialon (access_type): a sum of 0x100 (online tracking), 0x200, 0x400, 0x800, 0x1000, 0x2000, or -1 (unlimited: needs --wialon-allow-full-access)")
	fs.BoolVar(&a.AllowFullAccess, "wialon-allow-full-access", false, "allow --wialon-access-type=-1, and tokens with more rights than asked for")
	fs.StringVar(&a.LoginURL, "wialon-login-url", wialon.DefaultLoginURL, "hosted Wialon's login.html (a credential with a self-hosted base_url uses <base_url>/login.html)")
	fs.DurationVar(&e.ExpiryWarning, "credential-expiry-warning", credentials.DefaultExpiryWarning, "publish a credential's EXPIRING event this long before its token expires")
	fs.DurationVar(&e.CheckInterval, "credential-check-interval", credentials.DefaultCredentialCheckInt, "how often stored credentials are checked for expiring tokens and counted for the metrics")
}
