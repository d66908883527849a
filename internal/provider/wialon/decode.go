package wialon

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// Session is an open Wialon session.
type Session struct {
	// SID is the session id (token/login's "eid"). It is a bearer secret:
	// String, GoString and LogValue redact it.
	SID string
	// User is the account's user name ("au").
	User string
}

func (s Session) String() string       { return "wialon.Session{User:" + s.User + " SID:[redacted]}" }
func (s Session) GoString() string     { return s.String() }
func (s Session) LogValue() slog.Value { return slog.GroupValue(slog.String("user", s.User)) }

// Unit is an avl_unit with its last known position (nil if it never had one).
type Unit struct {
	ID   int64
	Name string
	Pos  *Position
}

// Position is one fix as Wialon reports it.
type Position struct {
	Time       time.Time // zero when Wialon did not say
	Lat, Lon   float64   // degrees (Wialon y, x)
	Altitude   float64   // metres (z)
	Speed      float64   // km/h (s)
	Course     float64   // degrees clockwise from north (c)
	Satellites int       // (sc)
}

// Message is one data message from messages/load_interval.
type Message struct {
	Time time.Time
	Type string    // "ud" for data messages
	Pos  *Position // nil for messages without position
	// Params are the tracker's raw parameters ("p"), left as Wialon sent them.
	Params json.RawMessage
}

// Trip is one trip from unit/get_trips.
type Trip struct {
	From, To       provider.TripEnd
	DistanceMeters float64
}

// The wire types below use pointers where a field is required, so that
// "missing" and "zero" differ, and concrete types everywhere, so that a
// wrong JSON type fails decoding instead of surfacing later.

type wirePos struct {
	T  *int64   `json:"t"`
	Y  *float64 `json:"y"`
	X  *float64 `json:"x"`
	Z  float64  `json:"z"`
	S  float64  `json:"s"`
	C  float64  `json:"c"`
	SC int      `json:"sc"`
}

func (w *wirePos) position(t int64) (*Position, error) {
	if w == nil {
		return nil, nil
	}
	if w.Y == nil || w.X == nil {
		return nil, errors.New("position without y/x")
	}
	if w.T != nil {
		t = *w.T
	}
	return &Position{Time: unixTime(t), Lat: *w.Y, Lon: *w.X, Altitude: w.Z, Speed: w.S, Course: w.C, Satellites: w.SC}, nil
}

func unixTime(t int64) time.Time {
	if t <= 0 {
		return time.Time{}
	}
	return time.Unix(t, 0).UTC()
}

// decodeError reads a top-level {"error": N, "reason": "..."}. isErr is
// false for replies that are not objects or have no "error" key.
func decodeError(body []byte) (code int, reason string, isErr bool, err error) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		if !json.Valid(trimmed) {
			return 0, "", false, errors.New("reply is not JSON")
		}
		return 0, "", false, nil
	}
	var e struct {
		Error  *json.RawMessage `json:"error"`
		Reason json.RawMessage  `json:"reason"`
	}
	if err := json.Unmarshal(trimmed, &e); err != nil {
		return 0, "", false, errors.New("reply is not a JSON object")
	}
	if e.Error == nil {
		return 0, "", false, nil
	}
	var n int
	if err := json.Unmarshal(*e.Error, &n); err != nil {
		return 0, "", false, errors.New(`"error" is not an integer`)
	}
	// reason is usually a string; anything else is ignored rather than quoted.
	_ = json.Unmarshal(e.Reason, &reason)
	return n, reason, true, nil
}

func decodeLogin(body []byte) (Session, error) {
	var r struct {
		EID  *string `json:"eid"`
		AU   string  `json:"au"`
		User *struct {
			NM string `json:"nm"`
		} `json:"user"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return Session{}, typeError(err)
	}
	if r.EID == nil || *r.EID == "" {
		return Session{}, errors.New("login reply has no eid")
	}
	user := r.AU
	if user == "" && r.User != nil {
		user = r.User.NM
	}
	return Session{SID: *r.EID, User: user}, nil
}

func decodeUnits(body []byte) ([]Unit, error) {
	var r struct {
		Items *[]struct {
			ID  *int64   `json:"id"`
			NM  string   `json:"nm"`
			Pos *wirePos `json:"pos"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, typeError(err)
	}
	if r.Items == nil {
		return nil, errors.New("search reply has no items")
	}
	units := make([]Unit, 0, len(*r.Items))
	for i, it := range *r.Items {
		if it.ID == nil {
			return nil, fmt.Errorf("item %d has no id", i)
		}
		pos, err := it.Pos.position(0)
		if err != nil {
			return nil, fmt.Errorf("item %d: %w", i, err)
		}
		units = append(units, Unit{ID: *it.ID, Name: it.NM, Pos: pos})
	}
	return units, nil
}

// decodeMessages reads a messages/load_interval reply: the messages
// returned and the count Wialon loaded into the session's message layer
// (0 if it did not say).
func decodeMessages(body []byte) ([]Message, int, error) {
	var r struct {
		Count    *int64 `json:"count"`
		Messages *[]struct {
			T   *int64          `json:"t"`
			TP  string          `json:"tp"`
			Pos *wirePos        `json:"pos"`
			P   json.RawMessage `json:"p"`
		} `json:"messages"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, 0, typeError(err)
	}
	if r.Messages == nil {
		return nil, 0, errors.New("load reply has no messages")
	}
	msgs := make([]Message, 0, len(*r.Messages))
	for i, m := range *r.Messages {
		if m.T == nil {
			return nil, 0, fmt.Errorf("message %d has no time", i)
		}
		pos, err := m.Pos.position(*m.T)
		if err != nil {
			return nil, 0, fmt.Errorf("message %d: %w", i, err)
		}
		var params json.RawMessage
		if len(m.P) > 0 && !bytes.Equal(m.P, []byte("null")) {
			params = append(json.RawMessage(nil), m.P...)
		}
		msgs = append(msgs, Message{Time: unixTime(*m.T), Type: m.TP, Pos: pos, Params: params})
	}
	total := 0
	if r.Count != nil && *r.Count > 0 {
		total = int(min(*r.Count, 1<<31-1))
	}
	return msgs, total, nil
}

func decodeTrips(body []byte) ([]Trip, error) {
	type point struct {
		T *int64 `json:"t"`
		P *struct {
			Y *float64 `json:"y"`
			X *float64 `json:"x"`
		} `json:"p"`
	}
	var r []struct {
		From *point  `json:"from"`
		To   *point  `json:"to"`
		M    float64 `json:"m"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, typeError(err)
	}
	conv := func(p *point) (provider.TripEnd, error) {
		if p == nil || p.T == nil {
			return provider.TripEnd{}, errors.New("trip point without time")
		}
		tp := provider.TripEnd{Time: unixTime(*p.T)}
		if p.P != nil && p.P.Y != nil && p.P.X != nil {
			tp.Lat, tp.Lon = *p.P.Y, *p.P.X
		}
		return tp, nil
	}
	trips := make([]Trip, 0, len(r))
	for i, t := range r {
		from, err := conv(t.From)
		if err != nil {
			return nil, fmt.Errorf("trip %d from: %w", i, err)
		}
		to, err := conv(t.To)
		if err != nil {
			return nil, fmt.Errorf("trip %d to: %w", i, err)
		}
		trips = append(trips, Trip{From: from, To: to, DistanceMeters: t.M})
	}
	return trips, nil
}

// typeError keeps the useful part of a JSON decoding error (which field had
// which wrong type) without quoting reply content.
func typeError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		// Value is e.g. "number 1.5": keep the kind, drop the content.
		kind, _, _ := strings.Cut(te.Value, " ")
		return fmt.Errorf("field %q: got JSON %s, want %s", te.Field, kind, te.Type)
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at offset %d", se.Offset)
	}
	return errors.New("unexpected reply shape")
}
