// Package fleetup is FleetUp behind fleetbroker's provider seam: a small
// client for the FleetUp API and Provider (provider.go), which mints for the
// credentials service and makes the gateway's calls with a shared JWT.
//
// What the client sends and expects follows shared/reference/upstream-facts.md
// (FleetUp); docs/gateway.md lists every call with its source and marks what
// no public source settles. In short: POST /token mints a JWT from an API
// key, account id and secret; every other call is a POST with a JSON body
// that sends x-api-key and the JWT, both as "Authorization: Bearer" (the
// docs) and as a "token" header (what production clients send); the HTTP
// status is the error signal.
//
// The client keeps no state: callers mint, cache the JWT until Token.Expiry,
// and mint again (once) when a call fails with upstream.KindSessionInvalid.
// A 401 the client can tell is not about the JWT — FleetUp refusing an
// endpoint to the account, while the same JWT still works elsewhere — is
// KindAccessDenied instead, so it never turns into a mint loop. Every HTTP
// request takes one slot of the caller's Budget; idempotent reads are
// retried a bounded number of times with jitter on 5xx and on 429 (after
// the Retry-After FleetUp asks for, shared through the Budget).
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
	"net/http"
	"slices"
	"strings"
	"sync"
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

// DefaultMaxRetryAfter is the longest Retry-After a read waits out before
// trying again; a longer one is reported to the caller (RESOURCE_EXHAUSTED
// with the wait), and still held on the shared budget.
const DefaultMaxRetryAfter = 5 * time.Second

// freshJWT: a 401 on a JWT FleetUp minted less than this long ago is not an
// expired token (they live an hour) but FleetUp refusing the call to the
// account (upstream-facts.md: enterprise accounts on JWT may use only
// /devices and /gpsdata/*). Minting again could not help.
const freshJWT = time.Minute

// Window limits of the history endpoints (upstream-facts.md, FleetUp).
const (
	// gpsWindow: "Retrieve GPS data within a 24-hour time range". Windows
	// span one second less, so a range with both ends inclusive never
	// reaches 24 hours.
	gpsWindow = 24*time.Hour - time.Second
	// tripWindow: /trips/history refuses a range over 30 days with 400;
	// windows cover at most 30 calendar days, both ends inclusive.
	tripWindow = 30
)

// Endpoints the client calls.
const (
	pathToken        = "/token"
	pathDevices      = "/devices"
	pathLastLocation = "/gpsdata/device-last-location"
	pathGPSHistory   = "/gpsdata"
	pathTrips        = "/trips/history"
)

// Budget paces one credential's requests. The gateway lends one shared by
// all its replicas; nil means unpaced (the credentials service's mints).
type Budget interface {
	// Take waits for one request slot; every HTTP request takes one.
	Take(ctx context.Context) error
	// Hold hands out no slot for d, on every replica: FleetUp answered
	// 429 with Retry-After d.
	Hold(ctx context.Context, d time.Duration) error
}

// Client calls the FleetUp API. It is safe for concurrent use.
type Client struct {
	hc            *http.Client
	attempts      int
	minDelay      time.Duration
	maxDelay      time.Duration
	maxRetryAfter time.Duration
	now           func() time.Time

	// gpsTimes remembers, per base URL, which time encoding /gpsdata took
	// (see GPSHistory).
	gpsTimes sync.Map // base URL → gpsTimeEncoding
}

// Option configures a Client.
type Option func(*Client)

// WithRetry sets how often idempotent reads are tried (attempts >= 1) and
// the jittered pause between tries after a 5xx or a network failure. The
// default is 3 attempts, 50–200 ms.
func WithRetry(attempts int, minDelay, maxDelay time.Duration) Option {
	return func(c *Client) {
		c.attempts = max(attempts, 1)
		c.minDelay, c.maxDelay = minDelay, max(maxDelay, minDelay)
	}
}

// WithMaxRetryAfter sets the longest Retry-After a read waits out before
// trying again (default DefaultMaxRetryAfter).
func WithMaxRetryAfter(d time.Duration) Option {
	return func(c *Client) { c.maxRetryAfter = max(d, 0) }
}

// New returns a client using a copy of hc (nil means a fresh client). The
// copy gets DefaultTimeout if hc has none, and never follows redirects:
// Go re-sends custom headers such as x-api-key to the redirect target, a
// host the allow-list never approved.
func New(hc *http.Client, opts ...Option) *Client {
	c := &Client{hc: upstream.ClientCopy(hc, DefaultTimeout), attempts: 3, minDelay: 50 * time.Millisecond, maxDelay: 200 * time.Millisecond,
		maxRetryAfter: DefaultMaxRetryAfter, now: time.Now}
	for _, o := range opts {
		o(c)
	}
	return c
}

// MintToken exchanges the account's credentials for a JWT (POST /token with
// x-api-key and {"acctId", "secret"}, as FleetUp's /token page documents).
// A 401 here means the credentials themselves are wrong: KindRejected.
// Never retried — FleetUp warns that repeated minting destabilises the
// integration.
func (c *Client) MintToken(ctx context.Context, baseURL, apiKey string, accountID int64, secret string) (Token, error) {
	const op = "POST /token"
	if err := checkHeaderValue(op, "API key", apiKey); err != nil {
		return Token{}, err
	}
	body, _ := json.Marshal(map[string]any{"acctId": accountID, "secret": secret})
	resp, err := c.do(ctx, op, http.MethodPost, baseURL, pathToken, map[string]string{"x-api-key": apiKey}, body, true, apiKey, secret)
	if err != nil {
		return Token{}, err
	}
	if resp.status == http.StatusNoContent {
		return Token{}, malformed(op, errors.New("empty reply"))
	}
	var r struct {
		Token      string      `json:"token"`
		ExpireTime json.Number `json:"expireTime"`
	}
	if err := json.Unmarshal(resp.body, &r); err != nil || r.Token == "" {
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
	return read(ctx, c, cred, op, pathDevices, requestBody(cred, nil), decodeDevices)
}

// LastLocations returns the last known position of the given devices, or of
// all devices when deviceIDs is empty (POST /gpsdata/device-last-location,
// body {acctId}). The endpoint answers for the whole account; filtering
// happens here.
func (c *Client) LastLocations(ctx context.Context, cred Auth, deviceIDs []string) ([]Location, error) {
	const op = "POST /gpsdata/device-last-location"
	all, err := read(ctx, c, cred, op, pathLastLocation, requestBody(cred, nil), func(reply []byte) ([]Location, error) {
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

// gpsTimeEncoding is how /gpsdata's startTime and endTime are written. No
// public source settles it (upstream-facts.md); FleetUp's other endpoints
// write times as YYYYMMDD / YYYYMMDDHHMMSS strings, so that goes first.
type gpsTimeEncoding int

const (
	gpsTimeCompact gpsTimeEncoding = iota // "YYYYMMDDHHMMSS", UTC
	gpsTimeUnix                           // Unix seconds, a number
)

func (e gpsTimeEncoding) format(t time.Time) any {
	if e == gpsTimeUnix {
		return t.Unix()
	}
	return t.UTC().Format("20060102150405")
}

// GPSHistory returns deviceID's fixes in [from, to] (POST /gpsdata, FleetUp's
// "Retrieve GPS data within a 24-hour time range"), one request per window
// of less than 24 hours, oldest first. The body is {acctId, devId,
// startTime, endTime}; the time encoding is unverified, so when FleetUp
// refuses the first window's input (400/422), that window is asked once
// more in the other plausible encoding, and the one that worked is kept
// for the base URL.
func (c *Client) GPSHistory(ctx context.Context, cred Auth, deviceID string, from, to time.Time) ([]Location, error) {
	const op = "POST /gpsdata"
	if err := checkRange(op, deviceID, from, to); err != nil {
		return nil, err
	}
	enc := gpsTimeCompact
	known := false
	if v, ok := c.gpsTimes.Load(cred.BaseURL); ok {
		enc, known = v.(gpsTimeEncoding), true
	}
	var out []Location
	// Windows are [start, start+gpsWindow] in whole seconds; the next starts
	// one second later so a fix on a boundary is not returned twice.
	for start := from.Truncate(time.Second); !start.After(to); {
		end := start.Add(gpsWindow)
		if end.After(to) {
			end = to
		}
		ask := func(enc gpsTimeEncoding) ([]Location, error) {
			body := requestBody(cred, map[string]any{"devId": deviceID, "startTime": enc.format(start), "endTime": enc.format(end)})
			return read(ctx, c, cred, op, pathGPSHistory, body, func(reply []byte) ([]Location, error) {
				return decodeLocations(reply, deviceID)
			})
		}
		locs, err := ask(enc)
		if err != nil && !known && upstream.KindOf(err) == upstream.KindInvalidInput {
			enc = 1 - enc
			locs, err = ask(enc)
		}
		if err != nil {
			return nil, err
		}
		if !known {
			c.gpsTimes.Store(cred.BaseURL, enc)
			known = true
		}
		out = append(out, locs...)
		start = end.Add(time.Second)
	}
	return out, nil
}

// Trips returns deviceID's trips overlapping [from, to] (POST /trips/history
// with {acctId, devId, startDate, endDate}, dates YYYYMMDD in UTC, both
// inclusive), one request per 30 days, so no range is ever refused for its
// length. FleetUp lists a trip under the day it started, so the day before
// from is asked too (a trip that started then may still overlap from);
// trips outside [from, to] are dropped here, and a trip reported by two
// windows is kept once.
func (c *Client) Trips(ctx context.Context, cred Auth, deviceID string, from, to time.Time) ([]Trip, error) {
	const op = "POST /trips/history"
	if err := checkRange(op, deviceID, from, to); err != nil {
		return nil, err
	}
	first := day(from).AddDate(0, 0, -1)
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
		trips, err := read(ctx, c, cred, op, pathTrips, body, func(reply []byte) ([]Trip, error) {
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

// Raw calls a read-only endpoint on allow and returns the status and the
// JSON reply as-is, except that the credential's API key and JWT are cut
// out of it. The method and path are checked first (see RawPaths.Check):
// a refused call never leaves the broker. A non-2xx status also comes back
// as an *upstream.Error (with the status and reply still returned). 204 is
// status 204, no reply, no error. Raw is never retried.
func (c *Client) Raw(ctx context.Context, cred Auth, allow *RawPaths, method, urlPath string, body json.RawMessage) (int, json.RawMessage, error) {
	if err := allow.Check(method, urlPath); err != nil {
		return 0, nil, err
	}
	path, _, _ := strings.Cut(urlPath, "?")
	op := method + " " + path
	if len(body) > 0 && !json.Valid(body) {
		return 0, nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: op, Reason: "body is not valid JSON"}
	}
	if method == http.MethodGet {
		body = nil
	}
	if err := checkAuth(op, cred); err != nil {
		return 0, nil, err
	}
	if err := cred.take(ctx); err != nil {
		return 0, nil, err
	}
	resp, callErr := c.do(ctx, op, method, cred.BaseURL, urlPath, authHeaders(cred), body, false, cred.APIKey, cred.JWT)
	if resp == nil {
		return 0, nil, callErr
	}
	if upstream.KindOf(callErr) == upstream.KindSessionInvalid {
		callErr = c.sessionOrRefused(ctx, cred, op, path, resp, callErr)
	}
	if upstream.KindOf(callErr) == upstream.KindRateLimited {
		c.hold(ctx, cred, callErr) // not retried: the hold is for the next call
	}
	reply := resp.body
	if len(bytes.TrimSpace(reply)) == 0 {
		return resp.status, nil, callErr
	}
	for _, sec := range []string{cred.APIKey, cred.JWT} {
		if len(sec) >= 4 {
			reply = bytes.ReplaceAll(reply, []byte(sec), []byte("[redacted]"))
		}
	}
	if !json.Valid(reply) {
		if callErr != nil {
			return resp.status, nil, callErr
		}
		return resp.status, nil, malformed(op, errors.New("reply is not JSON"))
	}
	return resp.status, reply, callErr
}
