package simulator

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// FleetUp, as shared/reference/upstream-facts.md describes it. Each
// behaviour below names its source there: [token page] is the /token seed
// page (shared/reference/fleetup-jwt-token.txt), [docs] FleetUp's public API
// docs, [clients] the two public production clients, [unverified] what no
// public source settles — there the simulator accepts or produces every
// plausible alternative, so a client that relies on one reading fails here
// as it would against FleetUp, and docs/gateway.md says which is a guess.
//
// - [token page] POST /token with x-api-key and {"acctId", "secret"} answers
//   {"token": "<JWT>"}, valid 3600 s (Config.JWTLifetime).
// - [clients] GET /token?acctId=…&secret=… with x-api-key answers the same
//   plus expireTime ([unverified] its unit: epoch milliseconds here).
// - [token page][clients] every other call sends x-api-key and the JWT, as
//   Authorization: Bearer (the docs) or as a "token" header (the clients);
//   [unverified] which one every endpoint accepts: either works here.
// - [token page][docs] the HTTP status is the error signal; an expired or
//   foreign JWT is 401.
// - [docs] enterprise accounts on JWT may use only /devices and /gpsdata/*;
//   [unverified] whether others are refused and with which status:
//   RestrictFleetUpAccount makes them answer 401 or 403.
// - [docs][clients] a "Rate Limit" page exists, its numbers unread; clients
//   pace at 0.5 s. Config.FleetUpAccountRate enforces a per-account pace
//   with 429 and Retry-After (off by default, its numbers [unverified]).
//
// Reply shapes deliberately differ per endpoint — {"data": [...]},
// {"trips": [...]}, a bare array, or 204 — because FleetUp's do, and clients
// must cope with all of them.

func fleetupError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"code": status, "message": msg})
}

// fleetupState is the FleetUp half's own state, guarded by Simulator.mu.
type fleetupState struct {
	restricted map[int64]int     // acctId → status for endpoints outside /devices, /gpsdata/*
	buckets    map[int64]*bucket // acctId → request budget (Config.FleetUpAccountRate)
	// rate and burst replace Config.FleetUpAccountRate and
	// FleetUpAccountBurst once SetFleetUpAccountRate was called.
	rate    float64
	burst   int
	rateSet bool
}

// bucket is a token bucket on the simulator's clock.
type bucket struct {
	tokens float64
	last   time.Time
}

// RestrictFleetUpAccount makes acctID an enterprise account on JWT as
// FleetUp's docs describe it: only /devices and /gpsdata/* answer; every
// other endpoint answers status (401 or 403: unverified which) to its JWTs.
// Status 0 lifts the restriction.
func (s *Simulator) RestrictFleetUpAccount(acctID int64, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fleetup.restricted == nil {
		s.fleetup.restricted = map[int64]int{}
	}
	if status == 0 {
		delete(s.fleetup.restricted, acctID)
		return
	}
	s.fleetup.restricted[acctID] = status
}

// SetFleetUpAccountRate replaces Config.FleetUpAccountRate and
// FleetUpAccountBurst; every account starts with a full budget.
func (s *Simulator) SetFleetUpAccountRate(rate float64, burst int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fleetup.rate, s.fleetup.burst, s.fleetup.rateSet = rate, burst, true
	s.fleetup.buckets = nil
}

// throttleLocked takes one request of acct's budget (Config.FleetUpAccountRate)
// and returns how long to wait when there is none.
func (s *Simulator) throttleLocked(acct int64) (wait time.Duration, limited bool) {
	rate, burstN := s.cfg.FleetUpAccountRate, s.cfg.FleetUpAccountBurst
	if s.fleetup.rateSet {
		rate, burstN = s.fleetup.rate, s.fleetup.burst
	}
	if rate <= 0 {
		return 0, false
	}
	burst := float64(max(burstN, 1))
	if s.fleetup.buckets == nil {
		s.fleetup.buckets = map[int64]*bucket{}
	}
	now := s.now()
	b := s.fleetup.buckets[acct]
	if b == nil {
		b = &bucket{tokens: burst, last: now}
		s.fleetup.buckets[acct] = b
	}
	b.tokens = math.Min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return 0, false
	}
	s.stats.FleetUpThrottled++
	return time.Duration((1 - b.tokens) / rate * float64(time.Second)), true
}

// throttled answers 429 with a Retry-After in whole seconds (at least 1),
// as HTTP allows, if acct is over its budget.
func (s *Simulator) throttled(w http.ResponseWriter, acct int64) bool {
	s.mu.Lock()
	wait, limited := s.throttleLocked(acct)
	s.mu.Unlock()
	if !limited {
		return false
	}
	w.Header().Set("Retry-After", strconv.Itoa(max(int(math.Ceil(wait.Seconds())), 1)))
	fleetupError(w, http.StatusTooManyRequests, "Too Many Requests")
	return true
}

// fleetupToken serves POST /token [token page].
func (s *Simulator) fleetupToken(w http.ResponseWriter, r *http.Request) {
	var body struct {
		AcctID json.Number `json:"acctId"`
		Secret string      `json:"secret"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.UseNumber()
	if err := dec.Decode(&body); err != nil {
		fleetupError(w, http.StatusBadRequest, "request body must be JSON")
		return
	}
	s.mintToken(w, r, string(body.AcctID), body.Secret, false)
}

// fleetupTokenGET serves GET /token?acctId=…&secret=…, as the production
// clients mint [clients]; its reply also carries expireTime.
func (s *Simulator) fleetupTokenGET(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	s.mintToken(w, r, q.Get("acctId"), q.Get("secret"), true)
}

func (s *Simulator) mintToken(w http.ResponseWriter, r *http.Request, acctID, secret string, withExpireTime bool) {
	acct, ok := s.lookupAccount(r.Header.Get("x-api-key"))
	id, err := strconv.ParseInt(acctID, 10, 64)
	// One answer for every mismatch, so the simulator can't be used to probe
	// which part was wrong (FleetUp answers 401 too).
	if !ok || err != nil || id != acct.id || !hmac.Equal([]byte(secret), []byte(acct.secret)) {
		fleetupError(w, http.StatusUnauthorized, "Unauthorized")
		return
	}
	if s.throttled(w, acct.id) {
		return
	}
	now := s.now()
	exp := now.Add(s.cfg.JWTLifetime)
	// The claims of FleetUp's documented example token [token page].
	jwt := s.signJWT(map[string]any{
		"sessionInfo": map[string]any{"accountId": acct.id, "roleType": 2, "locale": "en_US"},
		"sub":         "FleetUp OpenAPI",
		"iss":         "FleetUp",
		"iat":         now.Unix(),
		"exp":         exp.Unix(),
	})
	s.mu.Lock()
	s.stats.FleetUpMints++
	s.stats.FleetUpMintsByAccount[acct.id]++
	s.mu.Unlock()
	reply := map[string]any{"token": jwt}
	if withExpireTime {
		reply["expireTime"] = exp.UnixMilli()
	}
	writeJSON(w, http.StatusOK, reply)
}

func (s *Simulator) lookupAccount(apiKey string) (account, bool) {
	if apiKey == "" {
		return account{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.accounts[apiKey]
	return a, ok
}

// requestJWT is the JWT a request carries: Authorization: Bearer [docs] or
// a "token" header [clients]. Both present and different is no JWT.
func requestJWT(r *http.Request) (string, bool) {
	bearer, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	token := r.Header.Get("token")
	switch {
	case hasBearer && token != "" && token != bearer:
		return "", false
	case hasBearer:
		return bearer, bearer != ""
	default:
		return token, token != ""
	}
}

// jwtOnlyPath reports whether an enterprise account on JWT may call p [docs].
func jwtOnlyPath(p string) bool {
	return p == "/devices" || strings.HasPrefix(p, "/gpsdata/") || p == "/gpsdata"
}

// fleetupAuthed checks x-api-key and the JWT, the account's restrictions
// and budget, then calls next with the account the JWT was minted for.
func (s *Simulator) fleetupAuthed(next func(http.ResponseWriter, *http.Request, int64, map[string]json.RawMessage)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		acct, ok := s.lookupAccount(r.Header.Get("x-api-key"))
		jwt, hasJWT := requestJWT(r)
		if !ok || !hasJWT {
			fleetupError(w, http.StatusUnauthorized, "Unauthorized")
			return
		}
		claimsAcct, err := s.verifyJWT(jwt)
		if err != nil || claimsAcct != acct.id {
			fleetupError(w, http.StatusUnauthorized, "Unauthorized")
			return
		}
		s.mu.Lock()
		refuse := s.fleetup.restricted[acct.id]
		s.mu.Unlock()
		if refuse != 0 && !jwtOnlyPath(r.URL.Path) {
			fleetupError(w, refuse, "this API is not available to enterprise accounts authenticated by JWT")
			return
		}
		if s.throttled(w, acct.id) {
			return
		}
		s.mu.Lock()
		s.stats.FleetUpCallsByAccount[acct.id]++
		s.mu.Unlock()

		body := map[string]json.RawMessage{}
		raw, err := readBody(w, r)
		if err != nil {
			fleetupError(w, http.StatusBadRequest, "request body too large")
			return
		}
		if len(strings.TrimSpace(string(raw))) > 0 {
			if err := json.Unmarshal(raw, &body); err != nil {
				fleetupError(w, http.StatusBadRequest, "request body must be a JSON object")
				return
			}
		}
		next(w, r, acct.id, body)
	}
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	return io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
}

// fleetupDevices serves POST /devices [docs]: {"data": [...]}.
func (s *Simulator) fleetupDevices(w http.ResponseWriter, _ *http.Request, acct int64, _ map[string]json.RawMessage) {
	devs := make([]map[string]any, len(s.units))
	for i, u := range s.units {
		devs[i] = map[string]any{"devId": u.DevID, "devName": u.Name, "acctId": acct, "vin": "SIMVIN" + u.DevID[3:]}
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "msg": "success", "data": devs})
}

// fleetupLocation is one GPS fix. lat/lng are degrees, or milliarcseconds
// with Config.FleetUpLocationsInMAS: their unit on the /gpsdata endpoints
// is [unverified] (degrees the likely reading).
func (s *Simulator) fleetupLocation(u unit, f fix) map[string]any {
	lat, lng := any(f.Lat), any(f.Lon)
	if s.cfg.FleetUpLocationsInMAS {
		lat, lng = mas(f.Lat), mas(f.Lon)
	}
	return map[string]any{
		"devId":     u.DevID,
		"lat":       lat,
		"lng":       lng,
		"speed":     f.Speed,
		"direction": int(f.Course),
		"tmGps":     f.T.UTC().Format("2006-01-02 15:04:05"),
		"altitude":  f.Alt,
	}
}

// mas is degrees in milliarcseconds, FleetUp's unit for trip locations.
func mas(deg float64) int64 { return int64(math.Round(deg * 3_600_000)) }

// fleetupLastLocation serves POST /gpsdata/device-last-location, body
// {acctId}: {"data": [{devId, lat, lng, speed, direction, …}]} [docs].
func (s *Simulator) fleetupLastLocation(w http.ResponseWriter, _ *http.Request, _ int64, _ map[string]json.RawMessage) {
	now := s.now()
	out := make([]map[string]any, len(s.units))
	for i, u := range s.units {
		out[i] = s.fleetupLocation(u, u.at(now))
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "msg": "success", "data": out})
}

// fleetupGPSData serves "Retrieve GPS data within a 24-hour time range"
// (POST /gpsdata) [docs]: a range over 24 hours is refused. Its request
// fields and time format are [unverified]: devId, startTime and endTime are
// read here, the times in any plausible encoding (YYYYMMDDHHMMSS as string
// or number, Unix seconds or milliseconds, "YYYY-MM-DD HH:MM:SS", RFC 3339),
// and bad input is 400, as on /trips/history. Answers a bare array, or 204
// when there is nothing in the range.
func (s *Simulator) fleetupGPSData(w http.ResponseWriter, _ *http.Request, _ int64, body map[string]json.RawMessage) {
	u, ok := s.bodyDevice(w, body)
	if !ok {
		return
	}
	from, err1 := timeField(body["startTime"])
	to, err2 := timeField(body["endTime"])
	if err1 != nil || err2 != nil || to.Before(from) {
		fleetupError(w, http.StatusBadRequest, "startTime and endTime must be times, startTime <= endTime")
		return
	}
	if to.Sub(from) > 24*time.Hour {
		fleetupError(w, http.StatusBadRequest, "time range exceeds 24 hours")
		return
	}
	if now := s.now(); to.After(now) {
		to = now // no reports from the future
	}
	fixes, _ := u.fixes(from, to, 24*60+1)
	if len(fixes) == 0 {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	out := make([]map[string]any, len(fixes))
	for i, f := range fixes {
		out[i] = s.fleetupLocation(u, f)
	}
	writeJSON(w, http.StatusOK, out)
}

// fleetupTrips serves POST /trips/history [docs][clients]: body {acctId,
// devId, startDate, endDate}, dates YYYYMMDD (UTC), both days inclusive; a
// range over 30 days is refused with 400. The reply is wrapped in "trips";
// each trip has startTime/endTime as YYYYMMDDHHMMSS in UTC,
// startLocation/endLocation as "lat,lng" in milliarcseconds, tripMileage in
// metres, fuelWear in centilitres, tripScore, startAddress, endAddress.
// [unverified] which trips a range holds: here, the completed trips that
// started on its days, whole (a trip is listed under the day it started).
func (s *Simulator) fleetupTrips(w http.ResponseWriter, _ *http.Request, _ int64, body map[string]json.RawMessage) {
	u, ok := s.bodyDevice(w, body)
	if !ok {
		return
	}
	start, err1 := dateField(body["startDate"])
	end, err2 := dateField(body["endDate"])
	if err1 != nil || err2 != nil || end.Before(start) {
		fleetupError(w, http.StatusBadRequest, "startDate and endDate must be YYYYMMDD, startDate <= endDate")
		return
	}
	if days := int(end.Sub(start)/(24*time.Hour)) + 1; days > 30 {
		fleetupError(w, http.StatusBadRequest, "date range exceeds 30 days")
		return
	}
	trips := []map[string]any{}
	for _, t := range u.startedTrips(start, end.AddDate(0, 0, 1), s.now()) {
		trips = append(trips, map[string]any{
			"devId":         u.DevID,
			"startTime":     t.From.T.UTC().Format("20060102150405"),
			"endTime":       t.To.T.UTC().Format("20060102150405"),
			"startLocation": fmt.Sprintf("%d,%d", mas(t.From.Lat), mas(t.From.Lon)),
			"endLocation":   fmt.Sprintf("%d,%d", mas(t.To.Lat), mas(t.To.Lon)),
			"tripMileage":   int64(t.Metres),
			"fuelWear":      int64(math.Round(t.Metres / 100)), // 10 l/100 km, in centilitres
			"tripScore":     60 + int(mix(uint64(u.idx), uint64(t.From.T.Unix()))%41),
			"startAddress":  "Ring Road, " + u.city.name,
			"endAddress":    "Ring Road, " + u.city.name,
		})
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "msg": "success", "trips": trips})
}

// startedTrips returns u's whole driving periods that start in [from, to)
// and have ended by now.
func (u unit) startedTrips(from, to, now time.Time) []trip {
	cyc := int64(cycle / time.Second)
	off := int64(u.offset / time.Second)
	k, r := floorDiv(from.Unix()+off, cyc)
	if r != 0 {
		k++
	}
	speed := 2 * math.Pi * u.radius / float64(u.lap/time.Second) // m/s
	var out []trip
	for ; ; k++ {
		start := time.Unix(k*cyc-off, 0)
		end := start.Add(driveTime)
		if !start.Before(to) || end.After(now) {
			return out
		}
		out = append(out, trip{From: u.at(start), To: u.at(end), Metres: math.Round(speed * driveTime.Seconds())})
	}
}

func (s *Simulator) bodyDevice(w http.ResponseWriter, body map[string]json.RawMessage) (unit, bool) {
	var id string
	if err := json.Unmarshal(body["devId"], &id); err != nil || id == "" {
		fleetupError(w, http.StatusBadRequest, "devId is required")
		return unit{}, false
	}
	u, ok := s.unitByDevID(id)
	if !ok {
		fleetupError(w, http.StatusNotFound, "device not found")
		return unit{}, false
	}
	return u, true
}

// timeField reads a time in any encoding a FleetUp client may plausibly
// send to /gpsdata (see fleetupGPSData).
func timeField(raw json.RawMessage) (time.Time, error) {
	var str string
	if err := json.Unmarshal(raw, &str); err != nil {
		var n json.Number
		if err := json.Unmarshal(raw, &n); err != nil {
			return time.Time{}, err
		}
		str = n.String()
	}
	str = strings.TrimSpace(str)
	for _, layout := range []string{"20060102150405", "2006-01-02 15:04:05", time.RFC3339} {
		if t, err := time.Parse(layout, str); err == nil {
			return t, nil
		}
	}
	v, err := strconv.ParseInt(str, 10, 64)
	switch {
	case err != nil || v < 0:
		return time.Time{}, errors.New("not a time")
	case len(str) == 13:
		return time.UnixMilli(v), nil
	case len(str) <= 10:
		return time.Unix(v, 0), nil
	}
	return time.Time{}, errors.New("not a time")
}

func dateField(raw json.RawMessage) (time.Time, error) {
	var str string
	if err := json.Unmarshal(raw, &str); err != nil {
		var n json.Number
		if err := json.Unmarshal(raw, &n); err != nil {
			return time.Time{}, err
		}
		str = string(n)
	}
	return time.Parse("20060102", str)
}

// HS256 JWTs, like FleetUp's. Hand-rolled because the simulator needs only
// sign and verify with its own key.

var b64 = base64.RawURLEncoding

func (s *Simulator) signJWT(claims map[string]any) string {
	header := b64.EncodeToString([]byte(`{"typ":"JWT","alg":"HS256"}`))
	payload, _ := json.Marshal(claims) // plain maps always marshal
	signing := header + "." + b64.EncodeToString(payload)
	return signing + "." + b64.EncodeToString(s.mac(signing))
}

func (s *Simulator) mac(signing string) []byte {
	m := hmac.New(sha256.New, s.jwtKey)
	m.Write([]byte(signing))
	return m.Sum(nil)
}

var errBadJWT = errors.New("invalid or expired JWT")

// verifyJWT checks signature and expiry and returns the account id claim.
func (s *Simulator) verifyJWT(jwt string) (int64, error) {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return 0, errBadJWT
	}
	sig, err := b64.DecodeString(parts[2])
	if err != nil || !hmac.Equal(sig, s.mac(parts[0]+"."+parts[1])) {
		return 0, errBadJWT
	}
	payload, err := b64.DecodeString(parts[1])
	if err != nil {
		return 0, errBadJWT
	}
	var c struct {
		Exp         int64 `json:"exp"`
		SessionInfo struct {
			AccountID int64 `json:"accountId"`
		} `json:"sessionInfo"`
	}
	if err := json.Unmarshal(payload, &c); err != nil || !s.now().Before(time.Unix(c.Exp, 0)) {
		return 0, errBadJWT
	}
	return c.SessionInfo.AccountID, nil
}
