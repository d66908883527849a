package simulator

import (
	"encoding/json"
	"net/http"
	"time"
)

// Wialon Remote API: POST (or GET) /wialon/ajax.html with svc, params (JSON)
// and sid. Errors are {"error": N, "reason": "..."} with HTTP 200.

type session struct {
	user     string
	lastUsed time.Time
	// tokenFlags is the access type of the token that opened the session.
	tokenFlags int64
	// loaded is the message loader's content (messages/load_interval),
	// cleared by messages/unload.
	loaded *loaderState
}

type loaderState struct {
	unitID int64
}

// Wialon error numbers the simulator produces.
const (
	wErrInvalidSession = 1
	wErrInvalidService = 2
	wErrInvalidInput   = 4
	wErrAccessDenied   = 7
	wErrBadCredentials = 8
)

func wialonError(w http.ResponseWriter, code int, reason string) {
	m := map[string]any{"error": code}
	if reason != "" {
		m["reason"] = reason
	}
	writeJSON(w, http.StatusOK, m)
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
	if svc == "token/login" {
		s.wialonLogin(w, params)
		return
	}

	sess, ok := s.touchSession(r.Form.Get("sid"))
	if !ok {
		wialonError(w, wErrInvalidSession, "INVALID_SESSION")
		return
	}
	switch svc {
	case "core/search_items":
		s.wialonSearchItems(w, params)
	case "messages/load_interval":
		s.wialonLoadInterval(w, r.Form.Get("sid"), params)
	case "messages/unload":
		s.mu.Lock()
		sess.loaded = nil
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{})
	case "unit/get_trips":
		s.wialonTrips(w, sess, params)
	case "token/list":
		s.wialonTokenList(w, sess)
	case "core/logout":
		s.mu.Lock()
		delete(s.sessions, r.Form.Get("sid"))
		s.stats.WialonLogouts++
		s.mu.Unlock()
		wialonError(w, 0, "") // Wialon answers a successful logout with {"error":0}
	default:
		wialonError(w, wErrInvalidService, "unknown svc")
	}
}

func (s *Simulator) wialonLogin(w http.ResponseWriter, params json.RawMessage) {
	var p struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.Token == "" {
		wialonError(w, wErrInvalidInput, "token is required")
		return
	}
	now := s.now()
	s.mu.Lock()
	user, ok := s.tokens[p.Token]
	if !ok || s.tokenExpiredLocked(p.Token, now) {
		s.mu.Unlock()
		wialonError(w, wErrBadCredentials, "invalid token")
		return
	}
	s.sweepSessionsLocked()
	sid := randomHex(16)
	s.sessions[sid] = &session{user: user, lastUsed: now, tokenFlags: s.tokenFlagsLocked(p.Token)}
	s.stats.WialonLogins++
	s.stats.WialonLoginsByToken[Fingerprint(p.Token)]++
	s.mu.Unlock()

	writeJSON(w, http.StatusOK, map[string]any{
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

// touchSession finds a live session and marks it used. Sessions idle longer
// than WialonIdleTimeout are gone, as on Wialon.
func (s *Simulator) touchSession(sid string) (*session, bool) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, ok := s.sessions[sid]
	if !ok {
		return nil, false
	}
	if now.Sub(sess.lastUsed) > s.cfg.WialonIdleTimeout {
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
		if now.Sub(sess.lastUsed) > s.cfg.WialonIdleTimeout {
			delete(s.sessions, sid)
		}
	}
}

type wialonPos struct {
	T  int64   `json:"t,omitempty"`
	Y  float64 `json:"y"`
	X  float64 `json:"x"`
	Z  float64 `json:"z"`
	S  float64 `json:"s"`
	C  float64 `json:"c"`
	SC int     `json:"sc"`
}

func toWialonPos(f fix, withTime bool) wialonPos {
	p := wialonPos{Y: f.Lat, X: f.Lon, Z: f.Alt, S: f.Speed, C: float64(int(f.Course)), SC: f.Satellites}
	if withTime {
		p.T = f.T.Unix()
	}
	return p
}

func wialonMessage(f fix, i int) map[string]any {
	return map[string]any{
		"t": f.T.Unix(), "f": 3, "tp": "ud", "i": i,
		"pos": toWialonPos(f, false),
		"p":   map[string]any{"pwr_ext": 12.6, "odometer": 0},
	}
}

func (s *Simulator) wialonSearchItems(w http.ResponseWriter, params json.RawMessage) {
	var p struct {
		Spec struct {
			ItemsType string `json:"itemsType"`
		} `json:"spec"`
		Force int   `json:"force"`
		Flags int64 `json:"flags"`
		From  int   `json:"from"`
		To    int   `json:"to"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.From < 0 || p.To < 0 {
		wialonError(w, wErrInvalidInput, "invalid search params")
		return
	}
	var units []unit
	if p.Spec.ItemsType == "avl_unit" {
		units = s.units
	}
	to := len(units) - 1
	if p.To > 0 && p.To < to {
		to = p.To
	}
	now := s.now()
	items := []map[string]any{}
	for i := p.From; i <= to && i < len(units); i++ {
		u := units[i]
		item := map[string]any{"id": u.ID}
		if p.Flags&0x1 != 0 {
			item["nm"], item["cls"], item["mu"], item["uacl"] = u.Name, 2, 0, 0x1ff
		}
		if p.Flags&0x400 != 0 {
			f := u.at(now)
			item["pos"] = toWialonPos(f, true)
			item["lmsg"] = wialonMessage(f, 0)
		}
		items = append(items, item)
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"searchSpec":      p.Spec,
		"dataFlags":       p.Flags,
		"totalItemsCount": len(units),
		"indexFrom":       p.From,
		"indexTo":         to,
		"items":           items,
	})
}

func (s *Simulator) wialonLoadInterval(w http.ResponseWriter, sid string, params json.RawMessage) {
	var p struct {
		ItemID    *int64  `json:"itemId"`
		TimeFrom  *int64  `json:"timeFrom"`
		TimeTo    *int64  `json:"timeTo"`
		Flags     *int64  `json:"flags"`
		FlagsMask *int64  `json:"flagsMask"`
		LoadCount *uint32 `json:"loadCount"`
	}
	if err := json.Unmarshal(params, &p); err != nil ||
		p.ItemID == nil || p.TimeFrom == nil || p.TimeTo == nil || p.Flags == nil || p.FlagsMask == nil || p.LoadCount == nil {
		wialonError(w, wErrInvalidInput, "itemId, timeFrom, timeTo, flags, flagsMask and loadCount are required")
		return
	}
	u, ok := s.unitByID(*p.ItemID)
	if !ok {
		wialonError(w, wErrAccessDenied, "")
		return
	}
	from, to := time.Unix(*p.TimeFrom, 0), time.Unix(*p.TimeTo, 0)
	// Bound the work per request the way Wialon bounds loader size.
	if to.Sub(from) > 31*24*time.Hour {
		wialonError(w, wErrInvalidInput, "interval too long")
		return
	}
	fixes, total := u.fixes(from, to, int(min(*p.LoadCount, 100_000)))
	s.mu.Lock()
	if sess, ok := s.sessions[sid]; ok {
		sess.loaded = &loaderState{unitID: u.ID}
	}
	s.mu.Unlock()
	msgs := make([]map[string]any, len(fixes))
	for i, f := range fixes {
		msgs[i] = wialonMessage(f, i)
	}
	writeJSON(w, http.StatusOK, map[string]any{"count": total, "messages": msgs})
}

// wialonTrips serves unit/get_trips. With msgsSource 1 the trips come from
// the message loader, as on Wialon, so the loader must hold this unit's
// messages (error 4 otherwise — the exact code Wialon uses is a guess);
// without it the interval is read directly.
func (s *Simulator) wialonTrips(w http.ResponseWriter, sess *session, params json.RawMessage) {
	var p struct {
		ItemID     *int64 `json:"itemId"`
		TimeFrom   *int64 `json:"timeFrom"`
		TimeTo     *int64 `json:"timeTo"`
		MsgsSource any    `json:"msgsSource"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.ItemID == nil || p.TimeFrom == nil || p.TimeTo == nil {
		wialonError(w, wErrInvalidInput, "itemId, timeFrom and timeTo are required")
		return
	}
	u, ok := s.unitByID(*p.ItemID)
	if !ok {
		wialonError(w, wErrAccessDenied, "")
		return
	}
	if p.MsgsSource == 1.0 || p.MsgsSource == "1" {
		s.mu.Lock()
		loaded := sess.loaded
		s.mu.Unlock()
		if loaded == nil || loaded.unitID != u.ID {
			wialonError(w, wErrInvalidInput, "message loader does not hold this unit")
			return
		}
	}
	from, to := time.Unix(*p.TimeFrom, 0), time.Unix(*p.TimeTo, 0)
	if to.Sub(from) > 31*24*time.Hour {
		wialonError(w, wErrInvalidInput, "interval too long")
		return
	}
	type point struct {
		I int64              `json:"i"`
		T int64              `json:"t"`
		P map[string]float64 `json:"p"`
	}
	out := []map[string]any{}
	for _, t := range u.trips(from, to) {
		out = append(out, map[string]any{
			"from": point{I: (t.From.T.Unix() - from.Unix()) / 60, T: t.From.T.Unix(), P: map[string]float64{"y": t.From.Lat, "x": t.From.Lon}},
			"to":   point{I: (t.To.T.Unix() - from.Unix()) / 60, T: t.To.T.Unix(), P: map[string]float64{"y": t.To.Lat, "x": t.To.Lon}},
			"m":    t.Metres,
		})
	}
	writeJSON(w, http.StatusOK, out)
}
