// Package simulator serves Wialon- and FleetUp-compatible HTTP APIs with a
// moving demo fleet, for `fleetbroker dev`, tests and benchmarks. One
// http.Handler serves both: FleetUp paths at the root (/token, /devices, ...)
// and Wialon at /wialon/ajax.html. /sim/... exposes counters and run-time
// fault injection.
//
// It is a test double for the real APIs, not for fleetbroker's clients: it
// enforces what the real ones enforce (Wialon's per-session and per-IP
// limits, its idle timeout, its message layer: wialon_limits.go), citing
// upstream-facts.md beside each behaviour, so a client that passes here is
// not blocked there.
//
// It is a test double, not a security boundary: /sim endpoints are
// unauthenticated. Still, it never logs and never reports credentials:
// statistics name tokens and API keys only by a fingerprint.
package simulator

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Defaults of Config (and of `fleetbroker simulator`'s flags).
const (
	DefaultListen = ":7480"
	// DefaultJWTLifetime is FleetUp's: an hour.
	DefaultJWTLifetime = time.Hour
	// DefaultWialonIdleTimeout is Wialon's: a session idle this long ends.
	DefaultWialonIdleTimeout = 5 * time.Minute
	DefaultUnits             = 50
)

// Demo credentials, registered when Config.Demo is true, so that
// `fleetbroker dev` works with nothing configured. They open only the
// simulator.
const (
	DemoWialonToken      = "fleetbrokerDemoWialonToken0000000000000000000000000000000000000000000001"
	DemoFleetUpAPIKey    = "fleetbroker-demo-api-key"
	DemoFleetUpAccountID = int64(12345)
	DemoFleetUpSecret    = "fleetbroker-demo-secret"
)

// Config tunes a Simulator. Zero values mean the defaults noted.
type Config struct {
	// Latency is added to every non-/sim request.
	Latency time.Duration
	// JWTLifetime is how long a minted FleetUp JWT is valid (default 3600 s,
	// like FleetUp's).
	JWTLifetime time.Duration
	// WialonIdleTimeout ends a Wialon session unused for this long
	// (default 5 min, like Wialon's).
	WialonIdleTimeout time.Duration
	// The Wialon limits (wialon_limits.go): 0 means Wialon's documented
	// value, a negative value no limit. Requests and heavy requests at once
	// per session (10, 3; past them error 1003), failed and successful
	// logins per IP per minute (10, 120) and sessions per user per IP
	// (100; past any of them the IP is blocked for a minute), and messages
	// loaded into a user's sessions (15,000,000; past it error 1004).
	WialonSessionRequests       int
	WialonSessionHeavy          int
	WialonFailedLoginsPerMinute int
	WialonLoginsPerMinute       int
	WialonSessionsPerUserIP     int
	WialonLoadedMessagesLimit   int
	// Units is the size of the demo fleet (default 50).
	Units int
	// Faults are injected into non-/sim requests; see Faults.
	Faults Faults
	// Seed makes the fleet layout and fault draws reproducible.
	Seed int64
	// Demo registers the Demo* credentials.
	Demo bool
	// Now is the clock (default time.Now). Tests set it to move time
	// without sleeping: JWT expiry, idle timeouts and positions all follow it.
	Now func() time.Time
	// FleetUpAccountRate, if positive, is the FleetUp requests per second
	// each account may make (FleetUpAccountBurst at once, at least 1);
	// past it FleetUp answers 429 with Retry-After (see fleetup.go).
	FleetUpAccountRate  float64
	FleetUpAccountBurst int
	// FleetUpLocationsInMAS writes the lat/lng of FleetUp GPS fixes in
	// milliarcseconds instead of degrees (their unit is unverified).
	FleetUpLocationsInMAS bool
}

// Faults are probabilities in [0, 1], drawn independently per request.
type Faults struct {
	// ErrorRate: Wialon answers {"error":5}, FleetUp HTTP 503.
	ErrorRate float64 `json:"error_rate"`
	// RateLimitRate: Wialon answers {"error":1003}, FleetUp HTTP 429 with
	// Retry-After: 1.
	RateLimitRate float64 `json:"rate_limit_rate"`
	// SlowRate: the request is delayed by SlowDelay before being served.
	SlowRate  float64       `json:"slow_rate"`
	SlowDelay time.Duration `json:"slow_delay"`
}

func (f Faults) valid() bool {
	for _, p := range []float64{f.ErrorRate, f.RateLimitRate, f.SlowRate} {
		if math.IsNaN(p) || p < 0 || p > 1 {
			return false
		}
	}
	return f.SlowDelay >= 0
}

// Stats are the simulator's counters since New.
type Stats struct {
	WialonLogins  int64 `json:"wialon_logins"`
	WialonLogouts int64 `json:"wialon_logouts"`
	FleetUpMints  int64 `json:"fleetup_mints"`
	// Requests counts every non-/sim request by endpoint, e.g.
	// "wialon core/search_items" or "fleetup POST /devices".
	Requests map[string]int64 `json:"requests"`
	// WialonLoginsByToken is keyed by Fingerprint(token).
	WialonLoginsByToken map[string]int64 `json:"wialon_logins_by_token"`
	// FleetUpMintsByAccount and FleetUpCallsByAccount are keyed by acctId.
	FleetUpMintsByAccount map[int64]int64 `json:"fleetup_mints_by_account"`
	FleetUpCallsByAccount map[int64]int64 `json:"fleetup_calls_by_account"`
	// FleetUpThrottled counts 429s of Config.FleetUpAccountRate.
	FleetUpThrottled int64 `json:"fleetup_throttled"`
	// Faults counts injected faults: "error", "rate_limit", "slow".
	Faults map[string]int64 `json:"faults"`
	// ActiveWialonSessions is the number of sessions not yet logged out,
	// expired or idle.
	ActiveWialonSessions int `json:"active_wialon_sessions"`
	// WialonFailedLogins counts logins refused for a bad token or hash.
	WialonFailedLogins int64 `json:"wialon_failed_logins"`
	// WialonIPBlocks counts times an IP was blocked for its logins, and
	// WialonBlockedLogins the logins refused for it.
	WialonIPBlocks      int64 `json:"wialon_ip_blocks"`
	WialonBlockedLogins int64 `json:"wialon_blocked_logins"`
	// WialonLimitErrors counts 1003 answers of the enforced session limits
	// by reason (injected faults are in Faults).
	WialonLimitErrors map[string]int64 `json:"wialon_limit_errors"`
	// WialonPeakRequests and WialonPeakHeavy are the most requests and
	// heavy requests one session was serving at once.
	WialonPeakRequests int `json:"wialon_peak_requests"`
	WialonPeakHeavy    int `json:"wialon_peak_heavy"`
}

// Fingerprint names a credential in Stats without revealing it.
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(sum[:6])
}

// Simulator is safe for concurrent use.
type Simulator struct {
	cfg     Config
	now     func() time.Time
	units   []unit
	jwtKey  []byte
	handler http.Handler

	mu       sync.Mutex
	rng      *mrand.Rand
	faults   Faults
	tokens   map[string]string    // Wialon token -> user name
	issued   map[string]tokenMeta // Wialon tokens made by login.html (login.go)
	sessions map[string]*session
	// authHashes are core/create_auth_hash's hashes -> user name.
	authHashes map[string]string
	// logins are each IP's recent Wialon logins.
	logins   map[string]*ipLogins
	accounts map[string]account // FleetUp API key -> account
	stats    Stats
	fleetup  fleetupState
}

type account struct {
	id     int64
	secret string
}

// New returns a simulator with cfg's defaults filled in.
func New(cfg Config) *Simulator {
	if cfg.JWTLifetime <= 0 {
		cfg.JWTLifetime = DefaultJWTLifetime
	}
	if cfg.WialonIdleTimeout <= 0 {
		cfg.WialonIdleTimeout = DefaultWialonIdleTimeout
	}
	if cfg.Units <= 0 {
		cfg.Units = DefaultUnits
	}
	cfg.fillWialonLimits()
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Simulator{
		cfg:        cfg,
		now:        cfg.Now,
		units:      newFleet(cfg.Units, cfg.Seed),
		jwtKey:     randomBytes(32),
		rng:        mrand.New(mrand.NewPCG(uint64(cfg.Seed), 0x5eed)),
		faults:     cfg.Faults,
		tokens:     map[string]string{},
		issued:     map[string]tokenMeta{},
		sessions:   map[string]*session{},
		authHashes: map[string]string{},
		logins:     map[string]*ipLogins{},
		accounts:   map[string]account{},
		stats: Stats{
			Requests:              map[string]int64{},
			WialonLoginsByToken:   map[string]int64{},
			FleetUpMintsByAccount: map[int64]int64{},
			FleetUpCallsByAccount: map[int64]int64{},
			Faults:                map[string]int64{},
			WialonLimitErrors:     map[string]int64{},
		},
	}
	s.handler = s.routes()
	if cfg.Demo {
		s.AddWialonToken(DemoWialonToken)
		s.AddFleetUpAccount(DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	}
	return s
}

// AddWialonToken makes token valid for token/login.
func (s *Simulator) AddWialonToken(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.tokens[token]; !ok {
		s.tokens[token] = "sim_user_" + Fingerprint(token)[7:13]
	}
}

// RemoveWialonToken forgets token, as when a customer deletes it in Wialon:
// later logins with it answer error 8. Sessions it opened live on until
// they expire or idle out, as Wialon's do.
func (s *Simulator) RemoveWialonToken(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tokens, token)
	delete(s.issued, token)
}

// AddFleetUpAccount registers an API key with the account it opens.
func (s *Simulator) AddFleetUpAccount(apiKey string, accountID int64, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.accounts[apiKey] = account{id: accountID, secret: secret}
}

// SetFaults replaces the injected faults.
func (s *Simulator) SetFaults(f Faults) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = f
}

// ExpireWialonSessions ends every Wialon session, so the next call with an
// old sid gets error 1 — as after a Wialon restart.
func (s *Simulator) ExpireWialonSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.sessions)
}

// Stats returns a copy of the counters.
func (s *Simulator) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sweepSessionsLocked()
	st := s.stats
	st.Requests = cloneMap(s.stats.Requests)
	st.WialonLoginsByToken = cloneMap(s.stats.WialonLoginsByToken)
	st.FleetUpMintsByAccount = cloneMap(s.stats.FleetUpMintsByAccount)
	st.FleetUpCallsByAccount = cloneMap(s.stats.FleetUpCallsByAccount)
	st.Faults = cloneMap(s.stats.Faults)
	st.WialonLimitErrors = cloneMap(s.stats.WialonLimitErrors)
	st.ActiveWialonSessions = len(s.sessions)
	return st
}

func cloneMap[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Handler serves both provider APIs and the /sim endpoints.
func (s *Simulator) Handler() http.Handler { return s.handler }

func (s *Simulator) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /sim/stats", s.handleStats)
	mux.HandleFunc("GET /sim/faults", s.handleGetFaults)
	mux.HandleFunc("POST /sim/faults", s.handleSetFaults)
	mux.HandleFunc("POST /sim/expire-wialon-sessions", func(w http.ResponseWriter, _ *http.Request) {
		s.ExpireWialonSessions()
		w.WriteHeader(http.StatusNoContent)
	})

	mux.Handle("/wialon/ajax.html", s.inject(protoWialon, http.HandlerFunc(s.serveWialon)))
	mux.HandleFunc("GET /login.html", s.loginPage)
	mux.HandleFunc("POST /login.html", s.loginSubmit)
	for path, h := range map[string]http.HandlerFunc{
		"/token":                        s.fleetupToken,
		"/devices":                      s.fleetupAuthed(s.fleetupDevices),
		"/gpsdata/device-last-location": s.fleetupAuthed(s.fleetupLastLocation),
		"/gpsdata":                      s.fleetupAuthed(s.fleetupGPSData),
		"/trips/history":                s.fleetupAuthed(s.fleetupTrips),
	} {
		mux.Handle("POST "+path, s.inject(protoFleetUp, h))
	}
	mux.Handle("GET /token", s.inject(protoFleetUp, http.HandlerFunc(s.fleetupTokenGET)))
	// Anything else is a FleetUp-style 404, counted like any request.
	mux.Handle("/", s.inject(protoFleetUp, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]any{"code": 404, "message": "Not Found"})
	})))
	return mux
}

type protocol int

const (
	protoWialon protocol = iota
	protoFleetUp
)

// inject counts the request, adds latency and draws faults before next.
func (s *Simulator) inject(p protocol, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		endpoint := "fleetup " + r.Method + " " + r.URL.Path
		if p == protoWialon {
			// Bound the form like a real server would; ParseForm reads the body once
			// and the Wialon handler reuses r.Form.
			r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
			if err := r.ParseForm(); err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]any{"error": 4, "reason": "malformed form"})
				return
			}
			endpoint = "wialon " + r.Form.Get("svc")
		} else {
			// FleetUp's own clock, which the JWT's iat and exp follow.
			w.Header().Set("Date", s.now().UTC().Format(http.TimeFormat))
			// Read the body before any delay: net/http notices a client that
			// gave up only once the body is consumed, and a slow fault must end
			// when the client's deadline does.
			body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
			if err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]any{"code": 400, "message": "request body too large"})
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}

		s.mu.Lock()
		s.stats.Requests[endpoint]++
		f := s.faults
		slow := f.SlowRate > 0 && s.rng.Float64() < f.SlowRate
		fail := f.ErrorRate > 0 && s.rng.Float64() < f.ErrorRate
		limited := !fail && f.RateLimitRate > 0 && s.rng.Float64() < f.RateLimitRate
		switch {
		case fail:
			s.stats.Faults["error"]++
		case limited:
			s.stats.Faults["rate_limit"]++
		}
		if slow {
			s.stats.Faults["slow"]++
		}
		s.mu.Unlock()

		delay := s.cfg.Latency
		if slow {
			delay += f.SlowDelay
		}
		if p == protoWialon && !fail && !limited {
			// Served within the session's limits, latency included.
			next.ServeHTTP(w, r.WithContext(withDelay(r.Context(), delay)))
			return
		}
		if !sleep(r.Context(), delay) {
			return // client gone
		}

		switch {
		case fail && p == protoWialon:
			writeJSON(w, http.StatusOK, map[string]any{"error": 5, "reason": "simulated fault"})
		case fail:
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"code": 503, "message": "simulated fault"})
		case limited && p == protoWialon:
			writeJSON(w, http.StatusOK, map[string]any{"error": 1003, "reason": "LIMIT api_concurrent"})
		case limited:
			w.Header().Set("Retry-After", "1")
			writeJSON(w, http.StatusTooManyRequests, map[string]any{"code": 429, "message": "Too Many Requests"})
		default:
			next.ServeHTTP(w, r)
		}
	})
}

func (s *Simulator) handleStats(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.Stats())
}

func (s *Simulator) handleGetFaults(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	f := s.faults
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, f)
}

// handleSetFaults takes a JSON Faults; slow_delay is in nanoseconds (Go's
// time.Duration), or a string such as "250ms".
func (s *Simulator) handleSetFaults(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Faults
		SlowDelay json.RawMessage `json:"slow_delay"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]any{"message": "body must be a JSON Faults object"})
		return
	}
	f := in.Faults
	if len(in.SlowDelay) > 0 {
		var str string
		if err := json.Unmarshal(in.SlowDelay, &str); err == nil {
			d, err := time.ParseDuration(str)
			if err != nil {
				writeJSON(w, http.StatusBadRequest, map[string]any{"message": "slow_delay is not a duration"})
				return
			}
			f.SlowDelay = d
		} else if err := json.Unmarshal(in.SlowDelay, &f.SlowDelay); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{"message": "slow_delay is not a duration"})
			return
		}
	}
	if !f.valid() {
		writeJSON(w, http.StatusBadRequest, map[string]any{"message": "rates must be in [0, 1] and slow_delay >= 0"})
		return
	}
	s.SetFaults(f)
	writeJSON(w, http.StatusOK, f)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// sleep waits d or until ctx ends; it reports whether the full wait happened.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return b
}

func randomHex(n int) string { return hex.EncodeToString(randomBytes(n)) }

// unitByID / unitByDevID find a unit; ok is false for unknown ids.
func (s *Simulator) unitByID(id int64) (unit, bool) {
	i := id - s.units[0].ID
	if i < 0 || i >= int64(len(s.units)) {
		return unit{}, false
	}
	return s.units[i], true
}

func (s *Simulator) unitByDevID(id string) (unit, bool) {
	for _, u := range s.units {
		if strings.EqualFold(u.DevID, id) {
			return u, true
		}
	}
	return unit{}, false
}
