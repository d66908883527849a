// Package fleetup is FleetUp behind fleetbroker's provider seam: a small
// client for the FleetUp API — POST /token mints a JWT from an API key,
// account id and secret; every other call sends Authorization: Bearer <JWT>
// and the same x-api-key header; the HTTP status is the error signal — and
// Provider (provider.go), which mints for the credentials service and makes
// the gateway's calls with a shared JWT.
//
// The client keeps no state: callers mint, cache the JWT until Token.Expiry, and mint
// again (once) when a call fails with upstream.KindSessionInvalid. FleetUp
// asks integrations not to mint repeatedly and to make about one request per
// second per account; pacing is the caller's job.
//
// It must never log, and never put into an error, the API key, the account
// secret or a JWT. Provider texts quoted in errors, and Raw replies, are
// scrubbed of all three.
package fleetup

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

const providerName = "fleetup"

// DefaultTimeout bounds each HTTP request when the http.Client given to New
// has no Timeout of its own.
const DefaultTimeout = 30 * time.Second

// DefaultJWTLifetime is FleetUp's documented JWT validity, used only when a
// minted token's expiry cannot be read from it.
const DefaultJWTLifetime = 3600 * time.Second

// Window limits of the history endpoints.
const (
	gpsWindow  = 24 * time.Hour // "Retrieve GPS data within a 24-hour time range"
	tripWindow = 30             // /trips/history: at most 30 days
)

const maxReply = 64 << 20

// Client calls the FleetUp API. It is safe for concurrent use.
type Client struct {
	hc       *http.Client
	attempts int
	minDelay time.Duration
	maxDelay time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithRetry sets how often idempotent reads are tried (attempts >= 1) and
// the jittered pause between tries. The default is 3 attempts, 50–200 ms.
func WithRetry(attempts int, minDelay, maxDelay time.Duration) Option {
	return func(c *Client) {
		c.attempts = max(attempts, 1)
		c.minDelay, c.maxDelay = minDelay, max(maxDelay, minDelay)
	}
}

// New returns a client using a copy of hc (nil means a fresh client). The
// copy gets DefaultTimeout if hc has none, and never follows redirects:
// Go re-sends custom headers such as x-api-key to the redirect target, a
// host the allow-list never approved.
func New(hc *http.Client, opts ...Option) *Client {
	var cp http.Client
	if hc != nil {
		cp = *hc
	}
	if cp.Timeout <= 0 {
		cp.Timeout = DefaultTimeout
	}
	cp.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	c := &Client{hc: &cp, attempts: 3, minDelay: 50 * time.Millisecond, maxDelay: 200 * time.Millisecond}
	for _, o := range opts {
		o(c)
	}
	return c
}

// MintToken exchanges the account's credentials for a JWT (POST /token).
// A 401 here means the credentials themselves are wrong: KindRejected.
// Never retried — FleetUp warns that repeated minting destabilises the
// integration.
func (c *Client) MintToken(ctx context.Context, baseURL, apiKey string, accountID int64, secret string) (Token, error) {
	const op = "POST /token"
	if err := checkHeaderValue(op, "API key", apiKey); err != nil {
		return Token{}, err
	}
	body, _ := json.Marshal(map[string]any{"acctId": accountID, "secret": secret})
	status, reply, err := c.do(ctx, op, http.MethodPost, baseURL, "/token", map[string]string{"x-api-key": apiKey}, body, true, apiKey, secret)
	if err != nil {
		return Token{}, err
	}
	if status == http.StatusNoContent {
		return Token{}, malformed(op, errors.New("empty reply"))
	}
	var r struct {
		Token      string      `json:"token"`
		ExpireTime json.Number `json:"expireTime"`
	}
	if err := json.Unmarshal(reply, &r); err != nil || r.Token == "" {
		return Token{}, malformed(op, errors.New("reply has no token"))
	}
	exp, err := JWTExpiry(r.Token)
	if err != nil {
		// The token still works; fall back to what the reply or the docs
		// say rather than fail a mint that succeeded (and mint again).
		exp = time.Now().Add(DefaultJWTLifetime)
		if f, ferr := r.ExpireTime.Float64(); ferr == nil {
			if t, ok := epoch(f); ok {
				exp = t
			}
		}
	}
	return Token{JWT: r.Token, Expiry: exp}, nil
}

// Devices lists the account's devices (POST /devices).
func (c *Client) Devices(ctx context.Context, cred Auth) ([]Device, error) {
	const op = "POST /devices"
	return read(ctx, c, cred, op, "/devices", requestBody(cred, nil), decodeDevices)
}

// LastLocations returns the last known position of the given devices, or of
// all devices when deviceIDs is empty (POST /gpsdata/device-last-location).
// The endpoint answers for the whole account; filtering happens here.
func (c *Client) LastLocations(ctx context.Context, cred Auth, deviceIDs []string) ([]Location, error) {
	const op = "POST /gpsdata/device-last-location"
	all, err := read(ctx, c, cred, op, "/gpsdata/device-last-location", requestBody(cred, nil), func(reply []byte) ([]Location, error) {
		return decodeLocations(reply, "")
	})
	if err != nil || len(deviceIDs) == 0 {
		return all, err
	}
	out := all[:0]
	for _, l := range all {
		if slices.Contains(deviceIDs, l.DeviceID) {
			out = append(out, l)
		}
	}
	return out, nil
}

// GPSHistory returns deviceID's fixes in [from, to] (POST /gpsdata, FleetUp's
// "Retrieve GPS data within a 24-hour time range"), one request per 24-hour
// window, oldest first. Times go out as Unix seconds.
func (c *Client) GPSHistory(ctx context.Context, cred Auth, deviceID string, from, to time.Time) ([]Location, error) {
	const op = "POST /gpsdata"
	if err := checkRange(op, deviceID, from, to); err != nil {
		return nil, err
	}
	var out []Location
	// Windows are [start, start+24h] in whole seconds; the next starts one
	// second later so a fix on a boundary is not returned twice.
	for start := from.Unix(); start <= to.Unix(); {
		end := min(start+int64(gpsWindow/time.Second), to.Unix())
		body := requestBody(cred, map[string]any{"devId": deviceID, "startTime": start, "endTime": end})
		locs, err := read(ctx, c, cred, op, "/gpsdata", body, func(reply []byte) ([]Location, error) {
			return decodeLocations(reply, deviceID)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, locs...)
		start = end + 1
	}
	return out, nil
}

// Trips returns deviceID's trips overlapping [from, to] (POST /trips/history
// with startDate/endDate as YYYYMMDD in UTC, both inclusive), one request per
// 30 days. The endpoint works in whole days, so trips outside [from, to] are
// dropped here, and a trip reported by two windows is kept once.
func (c *Client) Trips(ctx context.Context, cred Auth, deviceID string, from, to time.Time) ([]Trip, error) {
	const op = "POST /trips/history"
	if err := checkRange(op, deviceID, from, to); err != nil {
		return nil, err
	}
	first := day(from)
	last := day(to)
	if to.After(from) && to.Equal(last) {
		last = last.AddDate(0, 0, -1) // an interval ending at midnight does not touch that day
	}
	type key struct{ from, to time.Time }
	seen := map[key]bool{}
	var out []Trip
	for start := first; !start.After(last); start = start.AddDate(0, 0, tripWindow) {
		end := start.AddDate(0, 0, tripWindow-1)
		if end.After(last) {
			end = last
		}
		body := requestBody(cred, map[string]any{
			"devId": deviceID, "startDate": start.Format("20060102"), "endDate": end.Format("20060102"),
		})
		trips, err := read(ctx, c, cred, op, "/trips/history", body, func(reply []byte) ([]Trip, error) {
			return decodeTrips(reply, deviceID)
		})
		if err != nil {
			return nil, err
		}
		for _, t := range trips {
			k := key{t.From.Time, t.To.Time}
			if t.To.Time.Before(from) || t.From.Time.After(to) || seen[k] {
				continue
			}
			seen[k] = true
			out = append(out, t)
		}
	}
	return out, nil
}

func day(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

func checkRange(op, deviceID string, from, to time.Time) error {
	switch {
	case deviceID == "":
		return &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "device id is required"}
	case from.IsZero() || to.Before(from):
		return &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "need from <= to"}
	}
	return nil
}

var rawMethods = []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete}

// Raw calls any other endpoint and returns the status and the JSON reply
// as-is, except that the credential's API key and JWT are cut out of it. A
// non-2xx status also comes back as an *upstream.Error (with the status and
// reply still returned). 204 is status 204, no reply, no error. Raw is never
// retried, and refuses /token: minting belongs to the broker.
func (c *Client) Raw(ctx context.Context, cred Auth, method, urlPath string, body json.RawMessage) (int, json.RawMessage, error) {
	op := method + " " + urlPath
	if !slices.Contains(rawMethods, method) {
		return 0, nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: "raw", Reason: "unsupported method"}
	}
	u, err := url.Parse(urlPath)
	if err != nil || u.Scheme != "" || u.Host != "" || u.User != nil || !strings.HasPrefix(u.Path, "/") || u.Fragment != "" ||
		path.Clean(u.Path) != strings.TrimSuffix(u.Path, "/") && u.Path != "/" {
		return 0, nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: "raw", Reason: "path must be a clean absolute path"}
	}
	op = method + " " + u.Path
	if strings.EqualFold(path.Clean(u.Path), "/token") {
		return 0, nil, &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: op, Reason: "minting is reserved for the broker"}
	}
	if len(body) > 0 && !json.Valid(body) {
		return 0, nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "body is not valid JSON"}
	}
	if method == http.MethodGet || method == http.MethodDelete {
		body = nil
	}
	if err := checkAuth(op, cred); err != nil {
		return 0, nil, err
	}
	status, reply, callErr := c.do(ctx, op, method, cred.BaseURL, urlPath, authHeaders(cred), body, false, cred.APIKey, cred.JWT)
	if status == 0 {
		return 0, nil, callErr
	}
	if len(bytes.TrimSpace(reply)) == 0 {
		return status, nil, callErr
	}
	for _, sec := range []string{cred.APIKey, cred.JWT} {
		if len(sec) >= 4 {
			reply = bytes.ReplaceAll(reply, []byte(sec), []byte("[redacted]"))
		}
	}
	if !json.Valid(reply) {
		if callErr != nil {
			return status, nil, callErr
		}
		return status, nil, malformed(op, errors.New("reply is not JSON"))
	}
	return status, reply, callErr
}

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

func authHeaders(cred Auth) map[string]string {
	return map[string]string{"x-api-key": cred.APIKey, "Authorization": "Bearer " + cred.JWT}
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

// read POSTs an idempotent read with retries on KindUnavailable and
// returns what decode makes of the 200 reply of the try that succeeded; 204
// (no data) is the zero value. Decoding failures are KindInternal and not
// retried.
func read[T any](ctx context.Context, c *Client, cred Auth, op, p string, body []byte, decode func([]byte) (T, error)) (T, error) {
	var zero T
	if err := checkAuth(op, cred); err != nil {
		return zero, err
	}
	return upstream.Retry(ctx, c.retryPolicy(), providerName, op, func() (T, error) {
		status, reply, err := c.do(ctx, op, http.MethodPost, cred.BaseURL, p, authHeaders(cred), body, false, cred.APIKey, cred.JWT)
		if err != nil || status == http.StatusNoContent {
			return zero, err
		}
		v, err := decode(reply)
		if err != nil {
			return zero, malformed(op, err)
		}
		return v, nil
	})
}

// do sends one request. It returns the status and body of any response; err
// is an *upstream.Error for transport failures and non-2xx statuses. mint
// selects the /token reading of 401. secrets are scrubbed from provider text.
func (c *Client) do(ctx context.Context, op, method, baseURL, p string, headers map[string]string, body []byte, mint bool, secrets ...string) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(baseURL, "/")+p, rd)
	if err != nil {
		return 0, nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "invalid base URL"}
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, transportError(ctx, op, err)
	}
	defer resp.Body.Close()
	reply, err := io.ReadAll(io.LimitReader(resp.Body, maxReply+1))
	if err != nil {
		return 0, nil, transportError(ctx, op, err)
	}
	if len(reply) > maxReply {
		return 0, nil, &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: op, Reason: "reply too large"}
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp.StatusCode, reply, nil
	}
	return resp.StatusCode, reply, classify(op, resp, reply, mint, secrets)
}

// classify maps a non-2xx status to what the caller should do.
func classify(op string, resp *http.Response, reply []byte, mint bool, secrets []string) *upstream.Error {
	code := resp.StatusCode
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: op, Code: code, Reason: scrub(reason(reply), secrets)}
	switch {
	case code == http.StatusUnauthorized && mint:
		e.Kind = upstream.KindRejected // the stored key/secret are wrong
	case code == http.StatusUnauthorized:
		e.Kind = upstream.KindSessionInvalid // JWT expired or revoked: mint again, once
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

func retryAfter(v string) time.Duration {
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs > 0 {
		return time.Duration(min(secs, 3600)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return min(d, time.Hour)
		}
	}
	return time.Second // FleetUp's documented pace: one request per second
}

// transportError classifies a failed round trip. The *url.Error wrapper is
// dropped because its text repeats the request URL.
func transportError(ctx context.Context, op string, err error) *upstream.Error {
	return upstream.TransportError(ctx, providerName, op, err)
}

// ctxError reports the caller's cancellation or deadline as KindUnavailable
// wrapping the context error, so errors.Is(err, context.Canceled) works.
func ctxError(op string, err error) *upstream.Error {
	return &upstream.Error{Kind: upstream.KindUnavailable, Provider: providerName, Op: op, Err: err}
}

func malformed(op string, err error) *upstream.Error {
	return &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: op, Reason: "malformed reply", Err: err}
}

// retryPolicy is the client's bounded, jittered retries (reads only).
func (c *Client) retryPolicy() upstream.RetryPolicy {
	return upstream.RetryPolicy{Attempts: c.attempts, MinDelay: c.minDelay, MaxDelay: c.maxDelay}
}

// scrub makes provider text safe to put in an error (see upstream.Scrub).
func scrub(s string, secrets []string) string { return upstream.Scrub(s, secrets) }
