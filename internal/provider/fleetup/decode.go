package fleetup

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
)

// Auth is what every call after /token needs. APIKey and JWT are secrets:
// String, GoString and LogValue redact them.
type Auth struct {
	BaseURL string
	APIKey  string
	JWT     string
	// AccountID is sent as "acctId" in request bodies, as FleetUp's own
	// examples do; 0 leaves it out.
	AccountID int64
}

func (a Auth) String() string {
	return fmt.Sprintf("fleetup.Auth{BaseURL:%s AccountID:%d APIKey:[redacted] JWT:[redacted]}", a.BaseURL, a.AccountID)
}
func (a Auth) GoString() string { return a.String() }
func (a Auth) LogValue() slog.Value {
	return slog.GroupValue(slog.String("base_url", a.BaseURL), slog.Int64("account_id", a.AccountID))
}

// Token is a minted JWT and when it expires.
type Token struct {
	JWT    string
	Expiry time.Time
}

func (t Token) String() string {
	return "fleetup.Token{JWT:[redacted] Expiry:" + t.Expiry.Format(time.RFC3339) + "}"
}
func (t Token) GoString() string     { return t.String() }
func (t Token) LogValue() slog.Value { return slog.GroupValue(slog.Time("expiry", t.Expiry)) }

// Device is one tracker of the account.
type Device struct {
	ID   string
	Name string
}

// Location is one GPS fix of a device.
type Location struct {
	DeviceID string
	Time     time.Time // zero when FleetUp did not say
	Lat, Lon float64
	Speed    float64 // as FleetUp reports it
	Heading  float64 // degrees
}

// Trip is one trip from /trips/history.
type Trip struct {
	DeviceID string
	From, To provider.TripEnd
	// Mileage is as FleetUp reports it; its unit is not documented (the
	// simulator uses kilometres).
	Mileage float64
}

// FleetUp's reply shapes vary: {"data": [...]}, {"trips": [...]}, a bare
// array, sometimes one object level deeper. records finds the array; field
// names vary too, so each value is looked up under a few known spellings.

type record map[string]json.RawMessage

// envelopeKeys are tried in order on an object reply.
var envelopeKeys = []string{"data", "trips", "list", "records", "result", "items"}

// records extracts the list of objects from a reply. An empty body or a null
// list is no records.
func records(body []byte) ([]record, error) {
	return recordsDepth(bytes.TrimSpace(body), 0)
}

func recordsDepth(body []byte, depth int) ([]record, error) {
	if len(body) == 0 || bytes.Equal(body, []byte("null")) {
		return nil, nil
	}
	switch body[0] {
	case '[':
		var raw []json.RawMessage
		if err := json.Unmarshal(body, &raw); err != nil {
			return nil, syntaxError(err)
		}
		out := make([]record, 0, len(raw))
		for i, r := range raw {
			if bytes.Equal(bytes.TrimSpace(r), []byte("null")) {
				continue
			}
			var rec record
			if err := json.Unmarshal(r, &rec); err != nil {
				return nil, fmt.Errorf("element %d is not an object", i)
			}
			out = append(out, rec)
		}
		return out, nil
	case '{':
		if depth >= 2 {
			return nil, errors.New("reply nests too deep")
		}
		var obj record
		if err := json.Unmarshal(body, &obj); err != nil {
			return nil, syntaxError(err)
		}
		for _, k := range envelopeKeys {
			if v, ok := obj[k]; ok {
				return recordsDepth(bytes.TrimSpace(v), depth+1)
			}
		}
		return nil, errors.New("reply has no data list")
	default:
		return nil, errors.New("reply is not a JSON object or array")
	}
}

func syntaxError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at offset %d", se.Offset)
	}
	return errors.New("invalid JSON")
}

// lookup returns the first present, non-null value among keys.
func (r record) lookup(keys ...string) (json.RawMessage, string, bool) {
	for _, k := range keys {
		if v, ok := r[k]; ok && !bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			return v, k, true
		}
	}
	return nil, "", false
}

// str accepts a JSON string or number (ids are either, depending on endpoint).
func (r record) str(keys ...string) (string, bool, error) {
	v, k, ok := r.lookup(keys...)
	if !ok {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(v, &s); err == nil {
		return s, true, nil
	}
	var n json.Number
	if err := json.Unmarshal(v, &n); err == nil {
		return n.String(), true, nil
	}
	return "", false, fmt.Errorf("field %q is not a string or number", k)
}

// num accepts a JSON number or a numeric string.
func (r record) num(keys ...string) (float64, bool, error) {
	v, k, ok := r.lookup(keys...)
	if !ok {
		return 0, false, nil
	}
	var f float64
	if err := json.Unmarshal(v, &f); err == nil {
		return f, true, nil
	}
	var s string
	if err := json.Unmarshal(v, &s); err == nil {
		if f, err := strconv.ParseFloat(strings.TrimSpace(s), 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
			return f, true, nil
		}
	}
	return 0, false, fmt.Errorf("field %q is not a number", k)
}

// timeLayouts are the string forms FleetUp is known or likely to use; all
// are read as UTC when they carry no zone.
var timeLayouts = []string{time.RFC3339Nano, "2006-01-02 15:04:05", "2006-01-02T15:04:05", "2006/01/02 15:04:05", "20060102150405"}

// time accepts epoch seconds or milliseconds (number or numeric string) or
// one of timeLayouts.
func (r record) time(keys ...string) (time.Time, bool, error) {
	v, k, ok := r.lookup(keys...)
	if !ok {
		return time.Time{}, false, nil
	}
	var s string
	if err := json.Unmarshal(v, &s); err == nil {
		s = strings.TrimSpace(s)
		for _, l := range timeLayouts {
			if t, err := time.Parse(l, s); err == nil {
				return t.UTC(), true, nil
			}
		}
		v = json.RawMessage(s) // maybe a quoted epoch
	}
	var n json.Number
	if err := json.Unmarshal(v, &n); err == nil {
		if f, err := n.Float64(); err == nil {
			if t, ok := epoch(f); ok {
				return t, true, nil
			}
		}
	}
	return time.Time{}, false, fmt.Errorf("field %q is not a time", k)
}

// epoch reads seconds, or milliseconds when the value is too large to be
// seconds before the year 5000.
func epoch(f float64) (time.Time, bool) {
	if math.IsNaN(f) || f <= 0 || f >= 1e14 {
		return time.Time{}, false
	}
	if f >= 1e11 {
		return time.UnixMilli(int64(f)).UTC(), true
	}
	return time.Unix(int64(f), 0).UTC(), true
}

func decodeDevices(body []byte) ([]Device, error) {
	recs, err := records(body)
	if err != nil {
		return nil, err
	}
	out := make([]Device, 0, len(recs))
	for i, r := range recs {
		id, ok, err := r.str("devId", "deviceId", "id")
		if err != nil || !ok || id == "" {
			return nil, recordError(i, err, "device id")
		}
		name, _, err := r.str("devName", "deviceName", "name", "vehicleName")
		if err != nil {
			return nil, recordError(i, err, "")
		}
		out = append(out, Device{ID: id, Name: name})
	}
	return out, nil
}

// decodeLocations reads GPS fixes; deviceID fills in records that do not
// name their device (history replies for one device may not).
func decodeLocations(body []byte, deviceID string) ([]Location, error) {
	recs, err := records(body)
	if err != nil {
		return nil, err
	}
	out := make([]Location, 0, len(recs))
	for i, r := range recs {
		var l Location
		var ok bool
		if l.DeviceID, ok, err = r.str("devId", "deviceId"); err != nil {
			return nil, recordError(i, err, "")
		}
		if !ok || l.DeviceID == "" {
			if deviceID == "" {
				return nil, recordError(i, nil, "device id")
			}
			l.DeviceID = deviceID
		}
		if l.Lat, ok, err = r.num("lat", "latitude"); err != nil || !ok || l.Lat < -90 || l.Lat > 90 {
			return nil, recordError(i, err, "valid lat")
		}
		if l.Lon, ok, err = r.num("lng", "lon", "longitude"); err != nil || !ok || l.Lon < -180 || l.Lon > 180 {
			return nil, recordError(i, err, "valid lng")
		}
		if l.Time, _, err = r.time("tmGps", "gpsTime", "time", "timestamp", "tm", "dateTime"); err != nil {
			return nil, recordError(i, err, "")
		}
		if l.Speed, _, err = r.num("speed", "spd"); err != nil {
			return nil, recordError(i, err, "")
		}
		if l.Heading, _, err = r.num("direction", "heading", "azimuth", "course"); err != nil {
			return nil, recordError(i, err, "")
		}
		out = append(out, l)
	}
	return out, nil
}

func decodeTrips(body []byte, deviceID string) ([]Trip, error) {
	recs, err := records(body)
	if err != nil {
		return nil, err
	}
	out := make([]Trip, 0, len(recs))
	for i, r := range recs {
		t := Trip{DeviceID: deviceID}
		if id, ok, err := r.str("devId", "deviceId"); err != nil {
			return nil, recordError(i, err, "")
		} else if ok && id != "" {
			t.DeviceID = id
		}
		var ok bool
		if t.From.Time, ok, err = r.time("startTime", "beginTime", "tripStartTime", "start"); err != nil || !ok {
			return nil, recordError(i, err, "start time")
		}
		if t.To.Time, ok, err = r.time("endTime", "stopTime", "tripEndTime", "end"); err != nil || !ok {
			return nil, recordError(i, err, "end time")
		}
		for _, f := range []struct {
			dst  *float64
			keys []string
		}{
			{&t.From.Lat, []string{"startLat", "beginLat"}},
			{&t.From.Lon, []string{"startLng", "startLon", "beginLng"}},
			{&t.To.Lat, []string{"endLat", "stopLat"}},
			{&t.To.Lon, []string{"endLng", "endLon", "stopLng"}},
			{&t.Mileage, []string{"mileage", "tripMileage", "distance"}},
		} {
			if *f.dst, _, err = r.num(f.keys...); err != nil {
				return nil, recordError(i, err, "")
			}
		}
		out = append(out, t)
	}
	return out, nil
}

func recordError(i int, err error, missing string) error {
	if err != nil {
		return fmt.Errorf("record %d: %w", i, err)
	}
	return fmt.Errorf("record %d: no %s", i, missing)
}
