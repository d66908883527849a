package app

import (
	"fmt"
	"html/template"
	"io"
	"net"
	"net/http"
)

// devReturnPath is a page `fleetbroker dev` serves on the callback listener
// to end a Wialon authorization at, standing in for a product's page.
const devReturnPath = "/dev/return"

// devAuthorizePublicURL is the callback listener's URL in dev: the address
// as given, or localhost when it is not a loopback address (with
// --dev-listen-anywhere), since browsers may use http only on loopback.
func devAuthorizePublicURL(configured string, lis net.Listener) string {
	addr := displayAddr(configured, lis)
	host, port, _ := net.SplitHostPort(addr)
	if host != "localhost" {
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			addr = net.JoinHostPort("localhost", port)
		}
	}
	return "http://" + addr
}

var devReturnPage = template.Must(template.New("return").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fleetbroker dev: Wialon connection</title></head>
<body style="font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto">
<h1>Wialon connection: {{.Status}}</h1>
<p>credential_id: <code>{{.CredentialID}}</code></p>
<p>This page stands in for your application's return URL (fleetbroker dev only).</p>
</body></html>
`))

// devAuthorizeHandler adds the dev return page to the callback handler
// (routed by hand, like the callback: see credentials.AuthorizeHandler).
func devAuthorizeHandler(callback http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != devReturnPath || r.Method != http.MethodGet {
			callback.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		q := r.URL.Query()
		_ = devReturnPage.Execute(w, struct{ Status, CredentialID string }{q.Get("status"), q.Get("credential_id")})
	})
}

func printConnectWalkthrough(out io.Writer, grpcAddr, simURL, authURL string) {
	fmt.Fprintf(out, `
Connect a Wialon account without copying a token (the simulator plays Wialon's login.html):
  Wialon authorization callback:             %[3]s
  # in another terminal, watch the tenant's credential events:
  grpcurl -plaintext -d '{"tenant_id":"acme"}' %[1]s fleetbroker.credentials.v1.CredentialService/WatchCredentialEvents
  URL=$(grpcurl -plaintext -d '{"tenant_id":"acme","credential_id":"wialon-main","base_url":"%[2]s","return_url":"%[3]s%[4]s","duration":"86400s"}' %[1]s fleetbroker.credentials.v1.CredentialService/StartWialonAuthorization | grep -o 'http[^"]*login.html[^"]*' | sed 's/\\u0026/\&/g')
  # open "$URL" in a browser and press Allow, or approve with curl and follow the redirects:
  curl -sL -d action=allow -d login=demo "$URL"
  grpcurl -plaintext -d '{"tenant_id":"acme","credential_id":"wialon-main"}' %[1]s fleetbroker.credentials.v1.CredentialService/GetCredential
`, grpcAddr, simURL, authURL, devReturnPath)
}
