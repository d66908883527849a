package simulator

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"time"
)

// Wialon Remote API: POST (or GET) /wialon/ajax.html with svc, params (JSON)
// and sid. Errors are {"error": N, "reason": "..."} with HTTP 200.
//
// Every behaviour below names its source in
// /work/shared/reference/upstream-facts.md ("facts: <section>") or says
// that no source settles it ("unverified"), as docs/gateway.md does. The
// limits themselves (concurrency per session, logins per IP, the message
// layer) are in wialon_limits.go.

type session struct {
	user string
	// ip is the address that logged in: the login limits and the sessions
	// per user per IP are counted by it.
	ip       string
	lastUsed time.Time
	// tokenFlags is the access type of the token that opened the session
	// (login.go): token/list needs -1.
	tokenFlags int64
	// layer is the message layer (messages/load_interval), cleared by
	// messages/unload. facts: "loads into the session's message layer".
	layer *layer
	// inflight and heavy are the requests this session is serving now.
	inflight, heavy int
	// layerBusy is set while a request that uses the message layer runs,
	// readers counts the trips and reports running (wialon_limits.go).
	layerBusy bool
	readers   int
}

// layer is what a load put into a session's message layer.
type layer struct {
	unitID int64
	// count is how many messages the load put in the layer: they count
	// against the user's limit of loaded messages until unloaded.
	count int
}

// Wialon error numbers the simulator produces (facts: "Error codes").
const (
	wErrInvalidSession = 1
	wErrInvalidService = 2
	wErrInvalidInput   = 4
	wErrAccessDenied   = 7
	wErrBadCredentials = 8
	wErrBatchStopped   = 10
	wErrLimit          = 1003
	wErrTooManyMsgs    = 1004
)

func wialonError(w http.ResponseWriter, code int, reason string) {
	writeJSON(w, http.StatusOK, wialonErrorValue(code, reason))
}

func wialonErrorValue(code int, reason string) map[string]any {
	m := map[string]any{"error": code}
	if reason != "" {
		m["reason"] = reason
	}
	return m
}

// wialonReply is one service's answer: a JSON value, or a Wialon error.
type wialonReply struct {
	value  any
	code   int
	reason string
}

func ok(v any) wialonReply                     { return wialonReply{value: v} }
func fail(code int, reason string) wialonReply { return wialonReply{code: code, reason: reason} }

func (r wialonReply) json() any {
	if r.code != 0 {
		return wialonErrorValue(r.code, r.reason)
	}
	return r.value
}

func (s *Simulator) serveWialon(w http.ResponseWriter, r *http.Request) {
	svc := r.Form.Get("svc")
	params := json.RawMessage(r.Form.Get("params"))
	if len(params) == 0 {
		params = json.RawMessage("{}")
	}
	if !json.Valid(params) {
		wialonError(w, wErrInvalidInput, "params is not JSON")
		return
	}
	ip := clientIP(r)
	if svc == "token/login" || svc == "core/use_auth_hash" {
		if !sleep(r.Context(), delayOf(r.Context())) {
			return
		}
		s.write(w, s.wialonLogin(ip, svc, params))
		return
	}

	sid := r.Form.Get("sid")
	sess, live := s.touchSession(sid)
	if !live {
		wialonError(w, wErrInvalidSession, "INVALID_SESSION")
		return
	}
	// The request holds its place in the session's limits for as long as
	// it is served, latency included, as on Wialon.
	release, refusal := s.admit(sess, svc, params)
	if refusal != "" {
		wialonError(w, wErrLimit, refusal)
		return
	}
	if !sleep(r.Context(), delayOf(r.Context())) {
		release()
		return
	}
	reply := s.wialonCall(ip, sid, sess, svc, params, 0)
	// Released before the reply is written, not when the handler returns: a
	// client holding the reply may send its next request at once, and must
	// find the slot free and the idle time running, as on Wialon.
	release()
	s.write(w, reply)
}

func (s *Simulator) write(w http.ResponseWriter, r wialonReply) {
	writeJSON(w, http.StatusOK, r.json())
}

// wialonCall serves one service of an open session; depth is the core/batch
// nesting.
func (s *Simulator) wialonCall(ip, sid string, sess *session, svc string, params json.RawMessage, depth int) wialonReply {
	switch svc {
	case "core/batch":
		return s.wialonBatch(ip, sid, sess, params, depth)
	case "core/search_items":
		return s.wialonSearchItems(params)
	case "core/search_item":
		return s.wialonSearchItem(params)
	case "messages/load_interval":
		return s.wialonLoadInterval(sess, params)
	case "messages/unload":
		s.mu.Lock()
		sess.layer = nil
		s.mu.Unlock()
		return ok(map[string]any{})
	case "unit/get_trips":
		return s.wialonTrips(sess, params)
	case "core/logout":
		s.mu.Lock()
		delete(s.sessions, sid)
		s.stats.WialonLogouts++
		s.mu.Unlock()
		return ok(map[string]any{"error": 0}) // facts: "0 success (e.g. logout)"
	case "core/duplicate":
		return s.wialonDuplicate(sess)
	case "core/create_auth_hash":
		return s.wialonCreateAuthHash(sess)
	case "token/list":
		return s.wialonTokenListReply(sess)
	case "token/update":
		return s.wialonTokenUpdate(sess, params)
	default:
		return fail(wErrInvalidService, "unknown svc")
	}
}

// wialonBatch runs core/batch: a list of {svc, params} run in order, whose
// replies come back in order, an error as {"error": N} in its place. The
// list is either params itself or params.params beside flags; with flags
// 1 the calls after a failed one answer error 10. facts: "core/batch runs
// a list of {svc, params} calls in one request and returns their replies
// in order"; the two forms and flags 1 → error 10 are from the same
// reference page (help.wialon.com …/core/batch). Nested batches are
// refused (unverified: Wialon's behaviour is not documented).
func (s *Simulator) wialonBatch(ip, sid string, sess *session, params json.RawMessage, depth int) wialonReply {
	calls, stopOnError, err := parseBatch(params)
	if err != nil || depth > 0 {
		return fail(wErrInvalidInput, "invalid batch")
	}
	out := make([]any, 0, len(calls))
	failed := false
	for _, c := range calls {
		if failed && stopOnError {
			out = append(out, wialonErrorValue(wErrBatchStopped, ""))
			continue
		}
		var r wialonReply
		if c.Svc == "token/login" || c.Svc == "core/use_auth_hash" {
			r = s.wialonLogin(ip, c.Svc, c.Params)
		} else {
			r = s.wialonCall(ip, sid, sess, c.Svc, c.Params, depth+1)
		}
		failed = failed || r.code != 0
		out = append(out, r.json())
	}
	return ok(out)
}

// batchCall is one call of a core/batch.
type batchCall struct {
	Svc    string          `json:"svc"`
	Params json.RawMessage `json:"params"`
}

// parseBatch reads both forms of core/batch params.
func parseBatch(params json.RawMessage) (calls []batchCall, stopOnError bool, err error) {
	if t := bytes.TrimSpace(params); len(t) > 0 && t[0] == '[' {
		err = json.Unmarshal(t, &calls)
	} else {
		var p struct {
			Params []batchCall `json:"params"`
			Flags  int         `json:"flags"`
		}
		err = json.Unmarshal(params, &p)
		calls, stopOnError = p.Params, p.Flags&1 != 0
	}
	for i := range calls {
		if len(calls[i].Params) == 0 {
			calls[i].Params = json.RawMessage("{}")
		}
	}
	return calls, stopOnError, err
}

// wialonLogin serves token/login and core/use_auth_hash, within the login
// limits of the caller's IP (wialon_limits.go).
func (s *Simulator) wialonLogin(ip, svc string, params json.RawMessage) wialonReply {
	var p struct {
		Token     string `json:"token"`
		AuthHash  string `json:"authHash"`
		OperateAs string `json:"operateAs"`
	}
	if err := json.Unmarshal(params, &p); err != nil || (svc == "token/login" && p.Token == "") || (svc != "token/login" && p.AuthHash == "") {
		return fail(wErrInvalidInput, "token is required")
	}
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if reason := s.loginBlockedLocked(ip, now); reason != "" {
		return fail(wErrLimit, reason)
	}
	var (
		user  string
		known bool
		// An auth hash logs in with its user's own rights, not a token's
		// (unverified: Wialon's docs do not say which rights it carries).
		flags int64 = -1
	)
	if svc == "token/login" {
		user, known = s.tokens[p.Token]
		// A login.html token past its duration is refused like a bad one
		// (login.go).
		known = known && !s.tokenExpiredLocked(p.Token, now)
		flags = s.tokenFlagsLocked(p.Token)
	} else {
		user, known = s.authHashes[p.AuthHash]
		delete(s.authHashes, p.AuthHash) // an auth hash opens one session
	}
	if !known {
		s.stats.WialonFailedLogins++
		s.countLoginLocked(ip, false, now)
		return fail(wErrBadCredentials, "invalid token")
	}
	if p.OperateAs != "" {
		// facts: "token/login params {token, operateAs (optional), fl}". The
		// user the token may operate as is not checked here (unverified:
		// Wialon answers some error for a user the token's user cannot
		// operate as).
		user = p.OperateAs
	}
	s.sweepSessionsLocked()
	if reason := s.openSessionBlockedLocked(ip, user, now); reason != "" {
		return fail(wErrLimit, reason)
	}
	sid := randomHex(16)
	s.sessions[sid] = &session{user: user, ip: ip, lastUsed: now, tokenFlags: flags}
	s.stats.WialonLogins++
	if svc == "token/login" {
		s.stats.WialonLoginsByToken[Fingerprint(p.Token)]++
	}
	return ok(map[string]any{
		"host":    "127.0.0.1",
		"eid":     sid,
		"gis_sid": randomHex(16),
		"au":      user,
		"tm":      now.Unix(),
		"user": map[string]any{
			"nm": user, "cls": 1, "id": 50_000, "prp": map[string]any{}, "crt": 0, "bact": 50_001, "fl": 6,
		},
		"classes": map[string]int{"avl_hw": 4, "avl_resource": 3, "avl_unit": 2, "avl_unit_group": 5, "user": 1},
	})
}

// wialonDuplicate opens a second session of the same user (core/duplicate):
// a session id the caller did not log in for. facts: the raw pass-through
// must not hand these out (issue 9).
func (s *Simulator) wialonDuplicate(sess *session) wialonReply {
	s.mu.Lock()
	defer s.mu.Unlock()
	sid := randomHex(16)
	s.sessions[sid] = &session{user: sess.user, ip: sess.ip, lastUsed: s.now(), tokenFlags: sess.tokenFlags}
	return ok(map[string]any{"eid": sid, "au": sess.user})
}

// wialonCreateAuthHash makes a one-time login hash for the session's user
// (core/create_auth_hash), which core/use_auth_hash turns into a session.
func (s *Simulator) wialonCreateAuthHash(sess *session) wialonReply {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := randomHex(16)
	s.authHashes[h] = sess.user
	return ok(map[string]any{"authHash": h})
}

// wialonTokenListReply lists the user's tokens with the token strings
// themselves (h). facts: "token/list returns the user's tokens including
// the token strings themselves (h)". Only a session opened with a token of
// unlimited rights (-1) may list tokens (error 7 otherwise); a token made
// by login.html is listed with its application, rights, activation,
// creation and duration (login.go), any other as unlimited.
func (s *Simulator) wialonTokenListReply(sess *session) wialonReply {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sess.tokenFlags != -1 {
		return fail(wErrAccessDenied, "ACCESS_DENIED")
	}
	out := []map[string]any{}
	for tok, user := range s.tokens {
		if user != sess.user {
			continue
		}
		entry := map[string]any{"h": tok, "app": "fleetbroker", "at": 0, "ct": 0, "dur": 0, "fl": -1, "p": "{}", "items": []any{}}
		if m, ok := s.issued[tok]; ok {
			entry["app"], entry["at"], entry["ct"], entry["dur"], entry["fl"] = m.app, m.activated.Unix(), m.created.Unix(), int64(m.duration/time.Second), m.flags
		}
		out = append(out, entry)
	}
	return ok(out)
}

// wialonTokenUpdate creates a token for the session's user (callMode
// "create") and returns it. facts: "token/update creates or changes
// tokens: both are credential-minting services".
func (s *Simulator) wialonTokenUpdate(sess *session, params json.RawMessage) wialonReply {
	var p struct {
		CallMode string `json:"callMode"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.CallMode != "create" {
		return fail(wErrInvalidInput, "only callMode create is simulated")
	}
	tok := randomAlnum(72)
	s.mu.Lock()
	s.tokens[tok] = sess.user
	s.mu.Unlock()
	return ok(map[string]any{"h": tok, "app": "fleetbroker", "at": 0, "dur": 0, "fl": -1})
}

// touchSession finds a live session and marks it used. A session unused
// for WialonIdleTimeout is gone and answers error 1. facts: "A session
// (eid, used as sid) ends after 5 minutes without a request. After that
// every call answers error 1."
func (s *Simulator) touchSession(sid string) (*session, bool) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[sid]
	if !ok {
		return nil, false
	}
	if now.Sub(sess.lastUsed) > s.cfg.WialonIdleTimeout && sess.inflight == 0 {
		delete(s.sessions, sid)
		return nil, false
	}
	sess.lastUsed = now
	return sess, true
}

// sweepSessionsLocked drops idle sessions so the map stays bounded under
// login-heavy benchmarks.
func (s *Simulator) sweepSessionsLocked() {
	now := s.now()
	for sid, sess := range s.sessions {
		if now.Sub(sess.lastUsed) > s.cfg.WialonIdleTimeout && sess.inflight == 0 {
			delete(s.sessions, sid)
		}
	}
}

// clientIP is the address a request came from, as Wialon counts logins
// and sessions per IP address.
func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomAlnum is a token-shaped random string.
func randomAlnum(n int) string {
	b := randomBytes(n)
	for i := range b {
		b[i] = alnum[int(b[i])%len(alnum)]
	}
	return string(b)
}
