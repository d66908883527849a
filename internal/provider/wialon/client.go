// Package wialon is Wialon behind fleetbroker's provider seam: a small
// client for the Wialon Remote API (POST <base>/wialon/ajax.html with form
// fields svc, params and sid), and Provider (provider.go), which logs in
// for the credentials service and makes the gateway's calls with a shared
// session.
//
// The client keeps no state about sessions: callers log in, keep the sid
// wherever they share sessions, and log in again (once) when a call fails
// with upstream.KindSessionInvalid.
//
// It must never log, and never put into an error, the access token or a
// session id. Tokens and sids travel only in the POST body — never in a URL,
// which proxies and http.Client errors repeat — and provider texts quoted in
// errors are scrubbed of both.
package wialon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

const providerName = "wialon"

// DefaultTimeout bounds each HTTP request when the http.Client given to New
// has no Timeout of its own.
const DefaultTimeout = 30 * time.Second

// maxReply bounds how much of a reply is read; a month of messages for one
// unit is a few MB.
const maxReply = 64 << 20

// Client calls the Wialon Remote API. It is safe for concurrent use.
type Client struct {
	hc       *http.Client
	attempts int
	minDelay time.Duration
	maxDelay time.Duration
	// loader serialises message-loader use per sid: the loader is session
	// state on Wialon's side, and two interleaved load/get_trips/unload
	// sequences on one session would read each other's messages. Striped
	// semaphores keep this bounded whatever the number of sessions.
	loader [64]chan struct{}
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
// copy gets DefaultTimeout if hc has none, and never follows redirects: a
// redirect would re-send the form — token or sid included — to a host the
// allow-list never approved.
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
	for i := range c.loader {
		c.loader[i] = make(chan struct{}, 1)
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Login opens a session with a 72-character access token (token/login).
func (c *Client) Login(ctx context.Context, baseURL, token string) (Session, error) {
	const svc = "token/login"
	params, _ := json.Marshal(map[string]any{"token": token, "fl": 1}) // fl 1: basic info (au, user)
	body, err := c.call(ctx, baseURL, "", svc, params, token)
	if err != nil {
		return Session{}, err
	}
	s, err := decodeLogin(body)
	if err != nil {
		return Session{}, malformed(svc, err)
	}
	return s, nil
}

// Logout ends a session (core/logout). Logging out a session Wialon no
// longer knows is not an error: the caller's goal is already reached.
func (c *Client) Logout(ctx context.Context, baseURL, sid string) error {
	_, err := c.call(ctx, baseURL, sid, "core/logout", []byte("{}"), sid)
	if upstream.KindOf(err) == upstream.KindSessionInvalid {
		return nil
	}
	return err
}

// searchUnitsParams is the BRIEF's search: every avl_unit by name, base
// properties (0x1) and last message with position (0x400).
var searchUnitsParams = []byte(`{"spec":{"itemsType":"avl_unit","propName":"sys_name","propValueMask":"*","sortType":"sys_name"},"force":1,"flags":1025,"from":0,"to":0}`)

// SearchUnits lists the session's units with their last position
// (core/search_items). Retried on KindUnavailable.
func (c *Client) SearchUnits(ctx context.Context, baseURL, sid string) ([]Unit, error) {
	const svc = "core/search_items"
	return retry(ctx, c, svc, func() ([]Unit, error) {
		body, err := c.call(ctx, baseURL, sid, svc, searchUnitsParams, sid)
		if err != nil {
			return nil, err
		}
		units, err := decodeUnits(body)
		if err != nil {
			return nil, malformed(svc, err)
		}
		return units, nil
	})
}

// LoadMessages returns up to loadCount positional data messages of unitID in
// [from, to] (messages/load_interval with flags 1, flagsMask 65281 — data
// messages with position — then messages/unload). loadCount <= 0 means all.
// Wialon error 1001 (no messages in the interval) is an empty result.
// The load is retried on KindUnavailable.
func (c *Client) LoadMessages(ctx context.Context, baseURL, sid string, unitID int64, from, to time.Time, loadCount int) ([]Message, error) {
	const svc = "messages/load_interval"
	count := uint32(0xffffffff) // Wialon: all found
	if loadCount > 0 && int64(loadCount) < 0xffffffff {
		count = uint32(loadCount)
	}
	release, err := c.lockLoader(ctx, svc, sid)
	if err != nil {
		return nil, err
	}
	defer release()

	body, err := c.loadInterval(ctx, baseURL, sid, unitID, from, to, count)
	if err != nil || body == nil {
		return nil, err
	}
	defer c.unload(ctx, baseURL, sid)
	msgs, err := decodeMessages(body)
	if err != nil {
		return nil, malformed(svc, err)
	}
	return msgs, nil
}

// Trips returns unitID's trips in [from, to] as Wialon's trip detector sees
// them. unit/get_trips reads the session's message loader (msgsSource 1), so
// this loads the interval first (without returning messages), then unloads.
// Both steps are retried on KindUnavailable.
func (c *Client) Trips(ctx context.Context, baseURL, sid string, unitID int64, from, to time.Time) ([]Trip, error) {
	const svc = "unit/get_trips"
	release, err := c.lockLoader(ctx, svc, sid)
	if err != nil {
		return nil, err
	}
	defer release()

	// loadCount 0: fill the loader, return no messages.
	body, err := c.loadInterval(ctx, baseURL, sid, unitID, from, to, 0)
	if err != nil || body == nil {
		return nil, err
	}
	defer c.unload(ctx, baseURL, sid)
	params, _ := json.Marshal(map[string]any{
		"itemId": unitID, "timeFrom": unixSec(from), "timeTo": unixSec(to), "msgsSource": 1,
	})
	return retry(ctx, c, svc, func() ([]Trip, error) {
		body, err := c.call(ctx, baseURL, sid, svc, params, sid)
		if err != nil {
			return nil, err
		}
		trips, err := decodeTrips(body)
		if err != nil {
			return nil, malformed(svc, err)
		}
		return trips, nil
	})
}

// loadInterval runs messages/load_interval with retries. A nil body and nil
// error mean Wialon found no messages (error 1001) and loaded nothing.
func (c *Client) loadInterval(ctx context.Context, baseURL, sid string, unitID int64, from, to time.Time, count uint32) ([]byte, error) {
	const svc = "messages/load_interval"
	if to.Before(from) {
		return nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: "to is before from"}
	}
	params, _ := json.Marshal(map[string]any{
		"itemId": unitID, "timeFrom": unixSec(from), "timeTo": unixSec(to),
		"flags": 1, "flagsMask": 65281, "loadCount": count,
	})
	body, err := retry(ctx, c, svc, func() ([]byte, error) {
		return c.call(ctx, baseURL, sid, svc, params, sid)
	})
	var ue *upstream.Error
	if errors.As(err, &ue) && ue.Code == errNoMessages {
		return nil, nil
	}
	return body, err
}

// unload clears the loader. It runs even when the caller's ctx has ended —
// a loaded session holds memory on Wialon's side until cleared — so it gets
// its own short deadline instead. Its error is dropped: the caller's result
// does not depend on it, and the next load replaces the content anyway.
func (c *Client) unload(ctx context.Context, baseURL, sid string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_, _ = c.call(ctx, baseURL, sid, "messages/unload", []byte("{}"), sid)
}

func (c *Client) lockLoader(ctx context.Context, op, sid string) (release func(), err error) {
	h := fnv.New32a()
	h.Write([]byte(sid))
	sem := c.loader[h.Sum32()%uint32(len(c.loader))]
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	case <-ctx.Done():
		return nil, ctxError(op, ctx.Err())
	}
}

var svcPattern = regexp.MustCompile(`^[a-z_]+/[a-z_0-9]+$`)

// rawDenied are services Raw refuses: they manage sessions and credentials,
// which the broker alone does. core/create_auth_hash would mint a login hash
// for the customer's account, core/duplicate a second session, token/* lists
// or creates tokens, core/logout would end a session other callers share.
var rawDenied = []string{"token/", "core/login", "core/logout", "core/create_auth_hash", "core/use_auth_hash", "core/duplicate"}

// Raw calls any other service and returns Wialon's JSON reply as-is. A
// {"error": N} reply is still returned as an *upstream.Error. Raw is never
// retried: the service may not be idempotent.
func (c *Client) Raw(ctx context.Context, baseURL, sid, svc string, params json.RawMessage) (json.RawMessage, error) {
	if !svcPattern.MatchString(svc) {
		return nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: "raw", Reason: "svc must look like group/name"}
	}
	for _, d := range rawDenied {
		if strings.HasPrefix(svc, d) {
			return nil, &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: svc, Reason: "service is reserved for the broker"}
		}
	}
	if len(params) == 0 {
		params = json.RawMessage("{}")
	}
	if !json.Valid(params) {
		return nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: "params is not valid JSON"}
	}
	body, err := c.call(ctx, baseURL, sid, svc, params, sid)
	if err != nil {
		return nil, err
	}
	if !json.Valid(body) {
		return nil, malformed(svc, errors.New("reply is not JSON"))
	}
	return body, nil
}

// call POSTs one request and returns the reply body, or an *upstream.Error.
// secrets are scrubbed from any provider text quoted in the error.
func (c *Client) call(ctx context.Context, baseURL, sid, svc string, params []byte, secrets ...string) ([]byte, error) {
	form := url.Values{"svc": {svc}, "params": {string(params)}}
	if sid != "" {
		form.Set("sid", sid)
	}
	endpoint := strings.TrimRight(baseURL, "/") + "/wialon/ajax.html"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		// The URL may hold anything the credential was stored with; don't quote it.
		return nil, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: "invalid base URL"}
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")

	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, transportError(ctx, svc, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxReply+1))
	if err != nil {
		return nil, transportError(ctx, svc, err)
	}
	if len(body) > maxReply {
		return nil, &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Reason: "reply too large"}
	}
	if resp.StatusCode != http.StatusOK {
		return nil, statusError(svc, resp)
	}
	code, reason, isErr, err := decodeError(body)
	if err != nil {
		return nil, malformed(svc, err)
	}
	if isErr && code != 0 {
		return nil, classify(svc, code, scrub(reason, secrets))
	}
	return body, nil
}

// Wialon error numbers with a meaning here.
const (
	errInvalidSession  = 1
	errInvalidInput    = 4
	errRequestFailed   = 5
	errAccessDenied    = 7
	errBadCredentials  = 8
	errAuthUnavailable = 9
	errTooManyRequests = 10
	errNoMessages      = 1001
	errConcurrentLimit = 1003
	errSessionExpired  = 1011
)

// classify maps a Wialon error number to what the caller should do.
func classify(svc string, code int, reason string) *upstream.Error {
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Code: code, Reason: reason}
	switch code {
	case errInvalidSession, errSessionExpired:
		e.Kind = upstream.KindSessionInvalid
	case errInvalidInput:
		e.Kind = upstream.KindInvalidInput
	case errAccessDenied:
		e.Kind = upstream.KindAccessDenied
	case errBadCredentials:
		// Only token/login judges the credential; elsewhere 8 is not a
		// verdict on the stored token and must not get it discarded.
		if svc == "token/login" {
			e.Kind = upstream.KindRejected
		}
	case errAuthUnavailable, errRequestFailed:
		e.Kind = upstream.KindUnavailable
	case errTooManyRequests, errConcurrentLimit:
		e.Kind = upstream.KindRateLimited
		e.RetryAfter = time.Second // Wialon gives no hint; one second spaces retries out
	}
	return e
}

func statusError(svc string, resp *http.Response) *upstream.Error {
	e := &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Reason: "HTTP " + strconv.Itoa(resp.StatusCode)}
	switch {
	case resp.StatusCode >= 500:
		e.Kind = upstream.KindUnavailable
	case resp.StatusCode == http.StatusTooManyRequests:
		e.Kind = upstream.KindRateLimited
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"))
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		e.Reason += " (redirects are not followed)"
	}
	return e
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
	return time.Second
}

// transportError classifies a failed round trip. The *url.Error wrapper is
// dropped because its text repeats the request URL.
func transportError(ctx context.Context, svc string, err error) *upstream.Error {
	return upstream.TransportError(ctx, providerName, svc, err)
}

// ctxError reports the caller's cancellation or deadline. It is
// KindUnavailable (no answer was had) and wraps the context error, so
// errors.Is(err, context.DeadlineExceeded) works.
func ctxError(svc string, err error) *upstream.Error {
	return &upstream.Error{Kind: upstream.KindUnavailable, Provider: providerName, Op: svc, Err: err}
}

func malformed(svc string, err error) *upstream.Error {
	return &upstream.Error{Kind: upstream.KindInternal, Provider: providerName, Op: svc, Reason: "malformed reply", Err: err}
}

// retry runs f with the client's bounded, jittered retries (reads only)
// and returns the value of the try that succeeded.
func retry[T any](ctx context.Context, c *Client, op string, f func() (T, error)) (T, error) {
	return upstream.Retry(ctx, upstream.RetryPolicy{Attempts: c.attempts, MinDelay: c.minDelay, MaxDelay: c.maxDelay}, providerName, op, f)
}

// scrub makes provider text safe to put in an error (see upstream.Scrub).
func scrub(s string, secrets []string) string { return upstream.Scrub(s, secrets) }

func unixSec(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

// String keeps fmt from printing a Client's internals.
func (c *Client) String() string { return fmt.Sprintf("wialon.Client(timeout=%s)", c.hc.Timeout) }
