package fleetup

import (
	"bytes"
	"context"
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
	// Budget paces every HTTP request made with this Auth; nil: unpaced.
	Budget Budget
}

// take spends one slot of a's budget, if it has one.
func (a Auth) take(ctx context.Context) error {
	if a.Budget == nil {
		return nil
	}
	return a.Budget.Take(ctx)
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
	Lat, Lon float64   // degrees
	Speed    float64   // as FleetUp reports it
	Heading  float64   // degrees
}

// Trip is one trip from /trips/history, in the units fleetbroker reports
// (upstream-facts.md, FleetUp: times YYYYMMDDHHMMSS UTC, locations "lat,lng"
// in milliarcseconds, tripMileage in metres, fuelWear in centilitres).
type Trip struct {
	DeviceID string
	// From and To carry degrees; both coordinates 0 when FleetUp gave no
	// location.
	From, To provider.TripEnd
	// DistanceM is tripMileage, in metres.
	DistanceM float64
	// FuelL is fuelWear converted to litres; FuelKnown is false when the
	// trip has no fuelWear.
	FuelL     float64
	FuelKnown bool
}

// masPerDegree: FleetUp trip locations are in milliarcseconds.
const masPerDegree = 3_600_000

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
		// FleetUp writes times as YYYYMMDDHHMMSS; as a JSON number that is
		// 14 digits, which no epoch in milliseconds reaches before 2286.
		if s := n.String(); len(s) == 14 && !strings.ContainsAny(s, ".eE+-") {
			if t, err := time.Parse("20060102150405", s); err == nil {
				return t.UTC(), true, nil
			}
		}
		if f, err := n.Float64(); err == nil {
			if t, ok := epoch(f); ok {
				return t, true, nil
			}
		}
	}
	return time.Time{}, false, fmt.Errorf("field %q is not a time", k)
}

// latLng reads a "lat,lng" string in milliarcseconds (FleetUp's trip
// locations) as degrees. ok is false when the field is absent or empty.
func (r record) latLng(key string) (lat, lon float64, ok bool, err error) {
	v, _, present := r.lookup(key)
	if !present {
		return 0, 0, false, nil
	}
	var s string
	if json.Unmarshal(v, &s) != nil {
		return 0, 0, false, fmt.Errorf("field %q is not a \"lat,lng\" string", key)
	}
	if s = strings.TrimSpace(s); s == "" {
		return 0, 0, false, nil
	}
	a, b, found := strings.Cut(s, ",")
	la, err1 := strconv.ParseFloat(strings.TrimSpace(a), 64)
	lo, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
	lat, lon = la/masPerDegree, lo/masPerDegree
	if !found || err1 != nil || err2 != nil || !validLatLon(lat, lon) {
		return 0, 0, false, fmt.Errorf("field %q is not \"lat,lng\" in milliarcseconds", key)
	}
	return lat, lon, true, nil
}

func validLatLon(lat, lon float64) bool {
	return !math.IsNaN(lat) && !math.IsNaN(lon) && lat >= -90 && lat <= 90 && lon >= -180 && lon <= 180
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
		if l.Lat, ok, err = r.num("lat", "latitude"); err != nil || !ok {
			return nil, recordError(i, err, "valid lat")
		}
		if l.Lon, ok, err = r.num("lng", "lon", "longitude"); err != nil || !ok {
			return nil, recordError(i, err, "valid lng")
		}
		// The unit of lat/lng here is unverified (upstream-facts.md):
		// degrees is the likely reading; a pair out of degree range is
		// read as milliarcseconds, FleetUp's unit for trip locations.
		if !validLatLon(l.Lat, l.Lon) {
			l.Lat, l.Lon = l.Lat/masPerDegree, l.Lon/masPerDegree
		}
		if !validLatLon(l.Lat, l.Lon) {
			return nil, recordError(i, nil, "valid lat/lng")
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

// decodeTrips reads /trips/history records in the shape upstream-facts.md
// gives (FleetUp's docs and a production extractor agree on it): no other
// field is read for a distance or a location, because a guessed unit is how
// distances once came out 1000 times too large.
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
		if t.From.Time, ok, err = r.time("startTime"); err != nil || !ok {
			return nil, recordError(i, err, "start time")
		}
		if t.To.Time, ok, err = r.time("endTime"); err != nil || !ok {
			return nil, recordError(i, err, "end time")
		}
		if t.From.Lat, t.From.Lon, _, err = r.latLng("startLocation"); err != nil {
			return nil, recordError(i, err, "")
		}
		if t.To.Lat, t.To.Lon, _, err = r.latLng("endLocation"); err != nil {
			return nil, recordError(i, err, "")
		}
		if t.DistanceM, _, err = r.num("tripMileage"); err != nil || t.DistanceM < 0 {
			return nil, recordError(i, err, "valid tripMileage")
		}
		var cl float64
		if cl, t.FuelKnown, err = r.num("fuelWear"); err != nil || cl < 0 {
			return nil, recordError(i, err, "valid fuelWear")
		}
		t.FuelL = cl / 100 // centilitres
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
