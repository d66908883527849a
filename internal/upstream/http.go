package upstream

import (
	"context"
	"io"
	"net/http"
	"time"
)

// Exchange sends req with hc and reads the reply, at most limit bytes, and
// closes it: the one round trip of every provider client. A failed round
// trip or read is a TransportError; a longer reply is KindInternal. The
// reply's status and headers are in the returned response.
func Exchange(ctx context.Context, hc *http.Client, req *http.Request, provider, op string, limit int64) (*http.Response, []byte, error) {
	resp, err := hc.Do(req)
	if err != nil {
		return nil, nil, TransportError(ctx, provider, op, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, nil, TransportError(ctx, provider, op, err)
	}
	if int64(len(body)) > limit {
		return nil, nil, &Error{Kind: KindInternal, Provider: provider, Op: op, Reason: "reply too large"}
	}
	return resp, body, nil
}

// ClientCopy returns a copy of hc (nil: a fresh client) for a provider
// client: timeout if hc has none, and redirects never followed — Go would
// re-send custom headers and forms (keys, tokens, sids) to a redirect target
// the allow-list never approved. The redirect comes back as the reply.
func ClientCopy(hc *http.Client, timeout time.Duration) *http.Client {
	var cp http.Client
	if hc != nil {
		cp = *hc
	}
	if cp.Timeout <= 0 {
		cp.Timeout = timeout
	}
	cp.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &cp
}
