package simulator

import (
	"encoding/json"
	"time"
)

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

// wialonSearchItems serves core/search_items. facts: "core/search_items
// with flags 1025 (base + last message) returns pos {t, y, x, z, s, c, sc}".
func (s *Simulator) wialonSearchItems(params json.RawMessage) wialonReply {
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
		return fail(wErrInvalidInput, "invalid search params")
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
	return ok(map[string]any{
		"searchSpec":      p.Spec,
		"dataFlags":       p.Flags,
		"totalItemsCount": len(units),
		"indexFrom":       p.From,
		"indexTo":         to,
		"items":           items,
	})
}

// wialonSearchItem serves core/search_item: one item by id, as
// core/search_items describes it (help.wialon.com …/core/search_item:
// {"item": {...}, "flags": n}, error 7 for an item not found).
func (s *Simulator) wialonSearchItem(params json.RawMessage) wialonReply {
	var p struct {
		ID    *int64 `json:"id"`
		Flags int64  `json:"flags"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.ID == nil {
		return fail(wErrInvalidInput, "id is required")
	}
	u, found := s.unitByID(*p.ID)
	if !found {
		return fail(wErrAccessDenied, "")
	}
	item := map[string]any{"id": u.ID}
	if p.Flags&0x1 != 0 {
		item["nm"], item["cls"], item["mu"], item["uacl"] = u.Name, 2, 0, 0x1ff
	}
	if p.Flags&0x400 != 0 {
		f := u.at(s.now())
		item["pos"] = toWialonPos(f, true)
		item["lmsg"] = wialonMessage(f, 0)
	}
	return ok(map[string]any{"item": item, "flags": p.Flags})
}

// wialonLoadInterval serves messages/load_interval: it loads the interval
// into the session's message layer (oldest first) and returns the first
// loadCount messages with the count loaded. facts: "messages/load_interval
// (itemId, timeFrom, timeTo, flags, flagsMask, loadCount) loads into the
// session's message layer (oldest first)". Past the user's limit of loaded
// messages it answers 1004 (facts: "messages: at most 15 million loaded
// into a user's sessions"; "1004 limit of messages exceeded" — that this
// limit is what answers 1004 is unverified).
func (s *Simulator) wialonLoadInterval(sess *session, params json.RawMessage) wialonReply {
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
		return fail(wErrInvalidInput, "itemId, timeFrom, timeTo, flags, flagsMask and loadCount are required")
	}
	u, found := s.unitByID(*p.ItemID)
	if !found {
		return fail(wErrAccessDenied, "")
	}
	from, to := time.Unix(*p.TimeFrom, 0), time.Unix(*p.TimeTo, 0)
	// Bound the work per request (unverified: Wialon bounds a load by the
	// messages it holds, below, not by the interval).
	if to.Sub(from) > 31*24*time.Hour {
		return fail(wErrInvalidInput, "interval too long")
	}
	fixes, total := u.fixes(from, to, int(min(*p.LoadCount, 100_000)))
	s.mu.Lock()
	// A new load replaces the layer's content (facts: "unload it before
	// the next load"; that a load without an unload replaces rather than
	// fails is unverified).
	loaded := s.loadedMessagesLocked(sess.user) - layerCount(sess.layer)
	if loaded+total > s.cfg.WialonLoadedMessagesLimit {
		s.mu.Unlock()
		return fail(wErrTooManyMsgs, "LIMIT messages")
	}
	sess.layer = &layer{unitID: u.ID, count: total}
	s.mu.Unlock()
	msgs := make([]map[string]any, len(fixes))
	for i, f := range fixes {
		msgs[i] = wialonMessage(f, i)
	}
	return ok(map[string]any{"count": total, "messages": msgs})
}

func layerCount(l *layer) int {
	if l == nil {
		return 0
	}
	return l.count
}

// loadedMessagesLocked is how many messages the user's sessions hold.
func (s *Simulator) loadedMessagesLocked(user string) int {
	n := 0
	for _, sess := range s.sessions {
		if sess.user == user {
			n += layerCount(sess.layer)
		}
	}
	return n
}

// wialonTrips serves unit/get_trips. facts: "unit/get_trips returns
// from/to {i, t, p {y, x}} and m (metres)". With msgsSource 1 the trips
// come from the message layer, which must hold this unit's messages (error
// 4 otherwise — the code Wialon uses is unverified); without it the
// interval is read directly.
func (s *Simulator) wialonTrips(sess *session, params json.RawMessage) wialonReply {
	var p struct {
		ItemID     *int64 `json:"itemId"`
		TimeFrom   *int64 `json:"timeFrom"`
		TimeTo     *int64 `json:"timeTo"`
		MsgsSource any    `json:"msgsSource"`
	}
	if err := json.Unmarshal(params, &p); err != nil || p.ItemID == nil || p.TimeFrom == nil || p.TimeTo == nil {
		return fail(wErrInvalidInput, "itemId, timeFrom and timeTo are required")
	}
	u, found := s.unitByID(*p.ItemID)
	if !found {
		return fail(wErrAccessDenied, "")
	}
	if p.MsgsSource == 1.0 || p.MsgsSource == "1" {
		s.mu.Lock()
		l := sess.layer
		s.mu.Unlock()
		if l == nil || l.unitID != u.ID {
			return fail(wErrInvalidInput, "message loader does not hold this unit")
		}
	}
	from, to := time.Unix(*p.TimeFrom, 0), time.Unix(*p.TimeTo, 0)
	if to.Sub(from) > 31*24*time.Hour {
		return fail(wErrInvalidInput, "interval too long")
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
	return ok(out)
}
