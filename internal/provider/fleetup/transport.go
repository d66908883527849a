package fleetup

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

const maxReply = 64 << 20

// requestBody is a request body: fields plus acctId when the account is known.
func requestBody(cred Auth, fields map[string]any) []byte {
	m := map[string]any{}
	for k, v := range fields {
		m[k] = v
	}
	if cred.AccountID != 0 {
		m["acctId"] = cred.AccountID
	}
	b, _ := json.Marshal(m) // plain values always marshal
	return b
}

// authHeaders sends the JWT both ways FleetUp is known to read it: the docs
// say Authorization: Bearer, production clients send a "token" header;
// which one every endpoint accepts is unverified (upstream-facts.md).
func authHeaders(cred Auth) map[string]string {
	return map[string]string{"x-api-key": cred.APIKey, "Authorization": "Bearer " + cred.JWT, "token": cred.JWT}
}

func checkAuth(op string, cred Auth) error {
	if cred.JWT == "" {
		// Nothing minted yet: the caller's remedy is the same as for an expired JWT.
		return &upstream.Error{Kind: upstream.KindSessionInvalid, Provider: providerName, Op: op, Reason: "no JWT"}
	}
	if err := checkHeaderValue(op, "API key", cred.APIKey); err != nil {
		return err
	}
	return checkHeaderValue(op, "JWT", cred.JWT)
}

// checkHeaderValue refuses values net/http would reject anyway, but with an
// error that names the field instead of failing inside the transport.
func checkHeaderValue(op, what, v string) error {
	if v == "" || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: what + " is empty or has control characters"}
	}
	return nil
}

// read POSTs an idempotent read and returns what decode makes of the 200
// reply of the try that succeeded; 204 (no data) is the zero value. Every
// try takes a slot of cred's budget. A 5xx or a network failure is tried
// again after a jittered pause; a 429 after its Retry-After (held on the
// shared budget, so no replica asks sooner), unless that is longer than the
// client waits or than ctx allows. At most c.attempts tries in all.
// Decoding failures are KindInternal and not retried.
func read[T any](ctx context.Context, c *Client, cred Auth, op, p string, body []byte, decode func([]byte) (T, error)) (T, error) {
	var zero T
	if err := checkAuth(op, cred); err != nil {
		return zero, err
	}
	var last error
	held := false // the last 429's wait is held on the shared budget
	for try := range c.attempts {
		if try > 0 {
			if err := c.pause(ctx, op, last, held); err != nil {
				return zero, err
			}
		}
		if err := cred.take(ctx); err != nil {
			return zero, err
		}
		resp, err := c.do(ctx, op, http.MethodPost, cred.BaseURL, p, authHeaders(cred), body, false, cred.APIKey, cred.JWT)
		if err == nil {
			if resp.status == http.StatusNoContent {
				return zero, nil
			}
			v, err := decode(resp.body)
			if err != nil {
				return zero, malformed(op, err)
			}
			return v, nil
		}
		switch upstream.KindOf(err) {
		case upstream.KindSessionInvalid:
			return zero, c.sessionOrRefused(ctx, cred, op, p, resp, err)
		case upstream.KindRateLimited:
			var retry bool
			if retry, held = c.hold(ctx, cred, err); !retry {
				return zero, err
			}
		case upstream.KindUnavailable:
			if ctx.Err() != nil {
				return zero, err
			}
		default:
			return zero, err
		}
		last = err
	}
	return zero, last
}

// hold shares a 429's Retry-After through cred's budget (held reports
// whether it could), and reports whether the read should wait it out and
// try again: not when the wait is longer than the client waits or than ctx
// allows.
func (c *Client) hold(ctx context.Context, cred Auth, err error) (retry, held bool) {
	var ue *upstream.Error
	if !errors.As(err, &ue) {
		return false, false
	}
	// If the budget cannot record the hold, this read still waits it out
	// itself (pause).
	held = cred.Budget != nil && cred.Budget.Hold(ctx, ue.RetryAfter) == nil
	if ue.RetryAfter > c.maxRetryAfter {
		return false, held
	}
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= ue.RetryAfter {
		return false, held
	}
	return true, held
}

// pause waits before the next try of a read: after a 429 its Retry-After
// plus up to a tenth more, unless the budget holds it (then Take waits, on
// every replica); after a 5xx or network failure, a jittered delay.
func (c *Client) pause(ctx context.Context, op string, last error, held bool) error {
	var d time.Duration
	var ue *upstream.Error
	switch {
	case errors.As(last, &ue) && ue.Kind == upstream.KindRateLimited:
		if held {
			return nil
		}
		d = ue.RetryAfter + rand.N(ue.RetryAfter/10+time.Millisecond)
	default:
		d = c.minDelay
		if span := c.maxDelay - c.minDelay; span > 0 {
			d += rand.N(span)
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctxError(op, ctx.Err())
	}
}

// sessionOrRefused decides what a 401 on a data call means. FleetUp
// answers 401 both for a JWT that expired or was revoked (mint again,
// once) and, upstream-facts.md notes, may refuse endpoints to enterprise
// accounts on JWT (unverified whether with 401 or 403). Minting again cannot
// help the second and would loop, so the 401 stays KindSessionInvalid only
// when the JWT is not fresh and fails on another endpoint too:
//
//   - a JWT past its exp (by FleetUp's clock when its reply has a Date):
//     KindSessionInvalid;
//   - a JWT FleetUp minted less than freshJWT ago (by FleetUp's own clock
//     when its reply has a Date): KindAccessDenied;
//   - otherwise the same JWT is tried on a documented JWT endpoint
//     (/devices, or the last locations when /devices was the call): if that
//     works, the call was refused to the account (KindAccessDenied); if it
//     answers 401 too, the JWT is dead (KindSessionInvalid); any other
//     failure of the probe is reported as it is.
func (c *Client) sessionOrRefused(ctx context.Context, cred Auth, op, p string, resp *response, unauthorized error) error {
	refused := func(why string) error {
		return &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: op, Code: http.StatusUnauthorized,
			Reason: "this endpoint is not allowed for the account: " + why}
	}
	now := c.now()
	if resp != nil && !resp.date.IsZero() {
		now = resp.date
	}
	if cl, err := parseClaims(cred.JWT); err == nil && !now.Before(cl.Exp) {
		return unauthorized // expired: no need to ask
	}
	if iat, ok := issuedAt(cred.JWT); ok && now.Sub(iat) < freshJWT {
		return refused(fmt.Sprintf("FleetUp refused a JWT it minted %s ago", max(now.Sub(iat), 0).Round(time.Second)))
	}
	probe := pathDevices
	if p == pathDevices {
		probe = pathLastLocation
	}
	if err := cred.take(ctx); err != nil {
		return err
	}
	_, err := c.do(ctx, "POST "+probe, http.MethodPost, cred.BaseURL, probe, authHeaders(cred), requestBody(cred, nil), false, cred.APIKey, cred.JWT)
	switch upstream.KindOf(err) {
	case upstream.KindSessionInvalid:
		return unauthorized
	case upstream.KindRateLimited:
		c.hold(ctx, cred, err)
		return err
	default:
		if err != nil {
			return err
		}
		return refused("the same JWT works for " + probe)
	}
}

// response is what do returns of an HTTP answer.
type response struct {
	status int
	body   []byte
	// date is the reply's Date header (FleetUp's clock); zero if absent.
	date time.Time
}

// do sends one request. It returns the response, if any; err is an
// *upstream.Error for transport failures and non-2xx statuses. mint selects
// the /token reading of 401. secrets are scrubbed from provider text.
func (c *Client) do(ctx context.Context, op, method, baseURL, p string, headers map[string]string, body []byte, mint bool, secrets ...string) (*response, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(baseURL, "/")+p, rd)
	if err != nil {
		return nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "invalid base URL"}
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, reply, err := upstream.Exchange(ctx, c.hc, req, providerName, op, maxReply)
	if err != nil {
		return nil, err
	}
	out := &response{status: resp.StatusCode, body: reply}
	if d, err := http.ParseTime(resp.Header.Get("Date")); err == nil {
		out.date = d
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return out, nil
	}
	return out, classify(op, resp, reply, mint, secrets)
}

// classify maps a non-2xx status to what the caller should do.
func classify(op string, resp *http.Response, reply []byte, mint bool, secrets []string) *upstream.Error {
	code := resp.StatusCode
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: op, Code: code, Reason: scrub(reason(reply), secrets)}
	switch {
	case code == http.StatusUnauthorized && mint:
		e.Kind = upstream.KindRejected // the stored key/secret are wrong
	case code == http.StatusUnauthorized:
		e.Kind = upstream.KindSessionInvalid // JWT expired or revoked: mint again, once (see sessionOrRefused)
	case code == http.StatusForbidden:
		e.Kind = upstream.KindAccessDenied
	case code == http.StatusNotFound:
		e.Kind = upstream.KindNotFound
	case code == http.StatusBadRequest || code == http.StatusUnprocessableEntity:
		e.Kind = upstream.KindInvalidInput
	case code == http.StatusTooManyRequests:
		e.Kind = upstream.KindRateLimited
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"))
	case code >= 500:
		e.Kind = upstream.KindUnavailable
	case code >= 300 && code < 400:
		e.Reason = "redirects are not followed"
	}
	return e
}

// reason extracts FleetUp's message from an error body, if it has one.
func reason(reply []byte) string {
	var m map[string]json.RawMessage
	if json.Unmarshal(reply, &m) != nil {
		return "" // not JSON: don't quote arbitrary bytes
	}
	for _, k := range []string{"message", "msg", "error", "errorMessage"} {
		var s string
		if json.Unmarshal(m[k], &s) == nil && s != "" {
			return s
		}
	}
	return ""
}

// retryAfter is FleetUp's Retry-After; without one, its documented pace:
// one request per second.
func retryAfter(v string) time.Duration { return upstream.RetryAfter(v, time.Second) }

// ctxError reports the caller's cancellation or deadline as KindUnavailable
// wrapping the context error, so errors.Is(err, context.Canceled) works.
func ctxError(op string, err error) *upstream.Error {
	return upstream.ContextError(providerName, op, err)
}

func malformed(op string, err error) *upstream.Error {
	return upstream.Malformed(providerName, op, err)
}

// scrub makes provider text safe to put in an error (see upstream.Scrub).
func scrub(s string, secrets []string) string { return upstream.Scrub(s, secrets) }
