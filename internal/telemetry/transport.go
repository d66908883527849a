package telemetry

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Providers, as InstrumentTransport expects them.
const (
	ProviderWialon  = "wialon"
	ProviderFleetUp = "fleetup"
)

var (
	// wialonServices are the Wialon Remote API services the broker calls,
	// and a few that callers commonly pass through CallProvider. svc is
	// chosen by callers of CallProvider, so anything else is Other.
	wialonServices = set("token/login", "core/logout", "core/search_items", "core/search_item",
		"core/batch", "messages/load_interval", "messages/load_last", "messages/unload", "unit/get_trips")
	// fleetupEndpoints are the FleetUp paths the broker calls, longest
	// first, matched as suffixes so a base URL with a path prefix (a proxy,
	// the simulator) still matches. A CallProvider path is chosen by the
	// caller and may hold ids, so anything else is Other.
	fleetupEndpoints = []string{"/gpsdata/device-last-location", "/trips/history", "/gpsdata", "/devices", "/token"}
	// statusCodes are the HTTP statuses the providers are documented to
	// answer with a meaning; any other is reported by class ("3xx"), so a
	// hostile self-hosted upstream cannot mint a series per status number.
	statusCodes = set("200", "204", "400", "401", "403", "404", "422", "429", "500", "502", "503", "504")
)

// maxFormScan bounds how much of a Wialon request body is scanned for svc.
// Bodies are small (a few hundred bytes); CallProvider params are bounded
// by the gRPC message size (1 MiB).
const maxFormScan = 2 << 20

// InstrumentTransport wraps rt so that every request records
// fleetbroker_upstream_request_duration_seconds{provider, endpoint, status},
// from the start of the request until its response body is closed (so a
// long download counts), or until the request failed.
//
// provider is ProviderWialon or ProviderFleetUp: give each provider client
// its own http.Client (they may share the same underlying transport, and so
// its connection pool). The endpoint label is bounded:
//
//   - Wialon: the form field svc of POST /wialon/ajax.html, if it is a known
//     service, else "other". The Wialon client never puts svc in the URL, so
//     it is read from a copy of the body (Request.GetBody, which
//     http.NewRequest sets for in-memory bodies): the body is scanned field
//     by field through a small buffer and nothing but svc is kept. Labelling
//     at the transport keeps the provider clients free of metrics code and
//     also covers the credentials service's validation logins.
//   - FleetUp: the path template ("/devices", "/token", …) if the path ends
//     with a known one, else "other". Ids travel in FleetUp's JSON bodies,
//     never in these paths.
//
// With a nil m, rt is returned unchanged.
func InstrumentTransport(rt http.RoundTripper, provider string, m *Metrics) http.RoundTripper {
	if m == nil {
		return rt
	}
	if rt == nil {
		rt = http.DefaultTransport
	}
	t := &instrumentedTransport{next: rt, m: m, provider: bounded(provider, providers)}
	switch t.provider {
	case ProviderWialon:
		t.endpoint = wialonEndpoint
	case ProviderFleetUp:
		t.endpoint = fleetupEndpoint
	default:
		t.endpoint = func(*http.Request) string { return Other }
	}
	return t
}

type instrumentedTransport struct {
	next     http.RoundTripper
	m        *Metrics
	provider string
	endpoint func(*http.Request) string
}

func (t *instrumentedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	endpoint := t.endpoint(req)
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		t.observe(endpoint, errorStatus(err), time.Since(start))
		return resp, err
	}
	status := httpStatus(resp.StatusCode)
	resp.Body = &observedBody{ReadCloser: resp.Body, done: func() { t.observe(endpoint, status, time.Since(start)) }}
	return resp, nil
}

func (t *instrumentedTransport) observe(endpoint, status string, took time.Duration) {
	t.m.upstream.WithLabelValues(t.provider, endpoint, status).Observe(took.Seconds())
}

// observedBody calls done once, when the body is closed.
type observedBody struct {
	io.ReadCloser
	once sync.Once
	done func()
}

func (b *observedBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

func httpStatus(code int) string {
	s := strconv.Itoa(code)
	if _, ok := statusCodes[s]; ok {
		return s
	}
	if code >= 100 && code <= 599 {
		return strconv.Itoa(code/100) + "xx"
	}
	return Other
}

func fleetupEndpoint(req *http.Request) string {
	p := strings.TrimSuffix(req.URL.Path, "/")
	for _, e := range fleetupEndpoints {
		if strings.HasSuffix(p, e) {
			return e
		}
	}
	return Other
}

// wialonEndpoint returns the request's svc form field if it is a known
// Wialon service. Only the body's copy from GetBody is read; the request
// itself is not touched.
func wialonEndpoint(req *http.Request) string {
	if svc := req.URL.Query().Get("svc"); svc != "" { // GET form, as the API allows
		return bounded(svc, wialonServices)
	}
	if req.GetBody == nil {
		return Other
	}
	body, err := req.GetBody()
	if err != nil {
		return Other
	}
	defer body.Close()
	svc, ok := formField(io.LimitReader(body, maxFormScan), "svc")
	if !ok {
		return Other
	}
	return bounded(svc, wialonServices)
}

// formField finds the first value of field name in an
// application/x-www-form-urlencoded body, reading it through a small
// buffer: long fields (params) are skipped, not held. In that encoding '&'
// and '=' inside values are escaped, so splitting on them is exact.
func formField(r io.Reader, name string) (string, bool) {
	br := bufio.NewReaderSize(r, 256)
	prefix := []byte(name + "=")
	for {
		field, err := br.ReadSlice('&')
		if errors.Is(err, bufio.ErrBufferFull) {
			// Longer than the buffer: not a short svc field; skip it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('&')
			}
			if err != nil {
				return "", false
			}
			continue
		}
		if v, ok := bytes.CutPrefix(bytes.TrimSuffix(field, []byte("&")), prefix); ok {
			s, uerr := url.QueryUnescape(string(v))
			return s, uerr == nil
		}
		if err != nil {
			return "", false
		}
	}
}
