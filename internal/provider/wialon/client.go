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
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"regexp"
	"slices"
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

// The client's default retries (send; docs/reliability.md, "Retry
// budget"): a request that failed after Wialon ran it (5, 6, 9, HTTP 5xx,
// no answer) is tried at most DefaultAttempts times, and one request at
// most DefaultLimitAttempts times in all, counting those Wialon refused
// unrun for a concurrency limit (1003, 10).
const (
	DefaultAttempts      = 3
	DefaultLimitAttempts = 4
)

// Client calls the Wialon Remote API. It is safe for concurrent use.
type Client struct {
	hc       *http.Client
	attempts int
	minDelay time.Duration
	maxDelay time.Duration
	// limitAttempts, limitBase and limitMax shape the jittered backoff
	// after Wialon refused a request for a concurrency limit (1003, 10).
	limitAttempts       int
	limitBase, limitMax time.Duration
	// raw is the raw pass-through's allow-list.
	raw rawPolicy
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

// WithLimitRetry sets how often a request Wialon refused for a
// concurrency limit (error 1003 or 10) is tried (attempts >= 1), with a
// jittered exponential backoff from base up to max. Such a request did not
// run, so every service is retried, not only reads. attempts also bounds
// the tries of one request in all, failed ones included (never below
// WithRetry's). The default is 4 attempts, 100 ms to 2 s.
func WithLimitRetry(attempts int, base, max time.Duration) Option {
	return func(c *Client) {
		c.limitAttempts = attempts
		c.limitBase, c.limitMax = base, max
	}
}

// WithRawServices sets Raw's allow-list of services (default
// DefaultRawServices); check it with CheckRawServices first.
func WithRawServices(services []string) Option {
	return func(c *Client) { c.raw = rawPolicy{allowed: slices.Clone(services)} }
}

// New returns a client using a copy of hc (nil means a fresh client). The
// copy gets DefaultTimeout if hc has none, and never follows redirects: a
// redirect would re-send the form — token or sid included — to a host the
// allow-list never approved.
func New(hc *http.Client, opts ...Option) *Client {
	c := &Client{hc: upstream.ClientCopy(hc, DefaultTimeout), attempts: DefaultAttempts, minDelay: 50 * time.Millisecond, maxDelay: 200 * time.Millisecond,
		limitAttempts: DefaultLimitAttempts, limitBase: 100 * time.Millisecond, limitMax: 2 * time.Second,
		raw: rawPolicy{allowed: DefaultRawServices}}
	for i := range c.loader {
		c.loader[i] = make(chan struct{}, 1)
	}
	for _, o := range opts {
		o(c)
	}
	c.limitAttempts = max(c.limitAttempts, 1)
	c.limitMax = max(c.limitMax, c.limitBase)
	return c
}

// Timeout is the bound of each HTTP request.
func (c *Client) Timeout() time.Duration { return c.hc.Timeout }

// Login opens a session with a 72-character access token (token/login).
func (c *Client) Login(ctx context.Context, baseURL, token string) (Session, error) {
	return c.LoginAs(ctx, baseURL, token, "")
}

// LoginAs opens a session with a token as the user operateAs names
// (token/login operateAs), or as the token's own user if it is empty. A
// login is never retried: a failed one counts against the IP's limit of
// failed logins.
func (c *Client) LoginAs(ctx context.Context, baseURL, token, operateAs string) (Session, error) {
	const svc = "token/login"
	p := map[string]any{"token": token, "fl": 1} // fl 1: basic info (au, user)
	if operateAs != "" {
		p["operateAs"] = operateAs
	}
	params, _ := json.Marshal(p)
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
	_, err := send(ctx, c, "core/logout", false, func() ([]byte, error) {
		return c.call(ctx, baseURL, sid, "core/logout", []byte("{}"), sid)
	})
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
	return send(ctx, c, svc, true, func() ([]Unit, error) {
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
	msgs, _, err := c.LoadPage(ctx, baseURL, sid, unitID, from, to, loadCount)
	return msgs, err
}

// LoadPage is LoadMessages that also returns how many messages the interval
// holds (Wialon's count of what it loaded): more than returned means the
// page was cut at loadCount, and the caller may load the rest from the last
// message's time on.
func (c *Client) LoadPage(ctx context.Context, baseURL, sid string, unitID int64, from, to time.Time, loadCount int) ([]Message, int, error) {
	const svc = "messages/load_interval"
	count := uint32(0xffffffff) // Wialon: all found
	if loadCount > 0 && int64(loadCount) < 0xffffffff {
		count = uint32(loadCount)
	}
	release, err := c.lockLoader(ctx, svc, sid)
	if err != nil {
		return nil, 0, err
	}
	defer release()

	body, err := c.loadInterval(ctx, baseURL, sid, unitID, from, to, count)
	if err != nil || body == nil {
		return nil, 0, err
	}
	defer c.unload(ctx, baseURL, sid)
	msgs, total, err := decodeMessages(body)
	if err != nil {
		return nil, 0, malformed(svc, err)
	}
	return msgs, max(total, len(msgs)), nil
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
	return send(ctx, c, svc, true, func() ([]Trip, error) {
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
	body, err := send(ctx, c, svc, true, func() ([]byte, error) {
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
	_, _ = send(ctx, c, "messages/unload", true, func() ([]byte, error) {
		return c.call(ctx, baseURL, sid, "messages/unload", []byte("{}"), sid)
	})
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

// Raw calls a service on the client's allow-list of read-only services
// (raw.go; core/batch when every call in it is) and returns Wialon's JSON
// reply with the session id cut out. A {"error": N} reply is still returned
// as an *upstream.Error. Raw is retried only when Wialon refused it for a
// concurrency limit (it did not run): the service may not be idempotent.
func (c *Client) Raw(ctx context.Context, baseURL, sid, svc string, params json.RawMessage) (json.RawMessage, error) {
	call, err := c.raw.check(svc, params)
	if err != nil {
		return nil, err
	}
	return c.sendRaw(ctx, baseURL, sid, call)
}

func (c *Client) sendRaw(ctx context.Context, baseURL, sid string, call rawCall) (json.RawMessage, error) {
	body, err := send(ctx, c, call.svc, false, func() ([]byte, error) {
		return c.call(ctx, baseURL, sid, call.svc, call.params, sid)
	})
	if err != nil {
		return nil, err
	}
	if !json.Valid(body) {
		return nil, malformed(call.svc, errors.New("reply is not JSON"))
	}
	return scrubSID(body, sid), nil
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

	resp, body, err := upstream.Exchange(ctx, c.hc, req, providerName, svc, maxReply)
	if err != nil {
		return nil, err
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

// send runs f, one Wialon request, with the client's bounded, jittered
// retries, and returns the value of the try that succeeded
// (docs/reliability.md, "Retry budget"):
//
//   - a request Wialon refused for a concurrency limit (KindRateLimited:
//     1003, 10) did not run, so it is tried again whatever it is, after an
//     exponential backoff with full jitter;
//   - a request that failed (KindUnavailable: 5, 6, 9, HTTP 5xx, no answer)
//     is tried again only when idempotent, after a jittered pause, at most
//     c.attempts times in all;
//   - at most max(c.limitAttempts, c.attempts) tries in all, of either kind.
//
// Another try starts only if the pause and a try as long as the last one
// fit before ctx's deadline; otherwise the last failure is returned marked
// upstream.ErrOutOfTime, so a slow upstream is reported as such within the
// caller's deadline and a shared read can tell a caller with more time to
// read again. A login never goes through here.
func send[T any](ctx context.Context, c *Client, op string, idempotent bool, f func() (T, error)) (T, error) {
	var zero T
	tries, limited, failed := 0, 0, 0
	maxTries := max(c.limitAttempts, c.attempts)
	for {
		start := time.Now()
		v, err := f()
		if err == nil {
			return v, nil
		}
		tries++
		last := max(time.Since(start), minAttempt)
		var pause time.Duration
		switch upstream.KindOf(err) {
		case upstream.KindRateLimited:
			limited++
			if tries >= maxTries {
				return zero, err
			}
			pause = backoff(c.limitBase, c.limitMax, limited)
		case upstream.KindUnavailable:
			failed++
			if !idempotent || failed >= c.attempts || tries >= maxTries {
				return zero, err
			}
			if ctx.Err() != nil {
				return zero, upstream.OutOfTime(err)
			}
			pause = c.minDelay
			if span := c.maxDelay - c.minDelay; span > 0 {
				pause += mrand.N(span)
			}
		default:
			return zero, err
		}
		if d, ok := ctx.Deadline(); ok && time.Until(d) < pause+last {
			return zero, upstream.OutOfTime(err) // the wait and another try would outlast the caller
		}
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return zero, ctxError(op, ctx.Err())
		}
	}
}

// minAttempt is the least time send counts another try as needing,
// however fast the last one failed.
const minAttempt = 50 * time.Millisecond

// backoff is the n-th (from 1) pause of an exponential backoff from base
// to max with full jitter, so replicas retrying together spread out.
func backoff(base, limit time.Duration, n int) time.Duration {
	d := base << min(n-1, 16)
	if d <= 0 || d > limit {
		d = limit
	}
	return d/2 + mrand.N(d/2+1)
}

func unixSec(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

// String keeps fmt from printing a Client's internals.
func (c *Client) String() string { return fmt.Sprintf("wialon.Client(timeout=%s)", c.hc.Timeout) }
