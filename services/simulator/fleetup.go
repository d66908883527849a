package simulator

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// FleetUp: POST /token with x-api-key and {"acctId", "secret"} returns
// {"token": "<JWT>"}; every other call needs the same x-api-key and
// Authorization: Bearer <JWT>. The HTTP status is the error signal.
//
// Reply shapes deliberately differ per endpoint — {"data": [...]},
// {"trips": [...]}, a bare array, or 204 — because FleetUp's do, and clients
// must cope with all of them.

func fleetupError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]any{"code": status, "message": msg})
}

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
	acct, ok := s.lookupAccount(r.Header.Get("x-api-key"))
	id, err := body.AcctID.Int64()
	// One answer for every mismatch, so the simulator can't be used to probe
	// which part was wrong (FleetUp answers 401 too).
	if !ok || err != nil || id != acct.id || !hmac.Equal([]byte(body.Secret), []byte(acct.secret)) {
		fleetupError(w, http.StatusUnauthorized, "Unauthorized")
		return
	}
	now := s.now()
	jwt := s.signJWT(map[string]any{
		"sessionInfo": map[string]any{"accountId": acct.id, "roleType": 2, "locale": "en_US"},
		"sub":         "FleetUp OpenAPI",
		"iss":         "FleetUp",
		"iat":         now.Unix(),
		"exp":         now.Add(s.cfg.JWTLifetime).Unix(),
	})
	s.mu.Lock()
	s.stats.FleetUpMints++
	s.stats.FleetUpMintsByAccount[acct.id]++
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]string{"token": jwt})
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

// fleetupAuthed checks x-api-key and the bearer JWT, then calls next with
// the account the JWT was minted for.
func (s *Simulator) fleetupAuthed(next func(http.ResponseWriter, *http.Request, int64, map[string]json.RawMessage)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		acct, ok := s.lookupAccount(r.Header.Get("x-api-key"))
		jwt, hasBearer := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !hasBearer {
			fleetupError(w, http.StatusUnauthorized, "Unauthorized")
			return
		}
		claimsAcct, err := s.verifyJWT(jwt)
		if err != nil || claimsAcct != acct.id {
			fleetupError(w, http.StatusUnauthorized, "Unauthorized")
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

func (s *Simulator) fleetupDevices(w http.ResponseWriter, _ *http.Request, acct int64, _ map[string]json.RawMessage) {
	devs := make([]map[string]any, len(s.units))
	for i, u := range s.units {
		devs[i] = map[string]any{"devId": u.DevID, "devName": u.Name, "acctId": acct, "vin": "SIMVIN" + u.DevID[3:]}
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "msg": "success", "data": devs})
}

func fleetupLocation(u unit, f fix) map[string]any {
	return map[string]any{
		"devId":     u.DevID,
		"lat":       f.Lat,
		"lng":       f.Lon,
		"speed":     f.Speed,
		"direction": int(f.Course),
		"tmGps":     f.T.UTC().Format("2006-01-02 15:04:05"),
		"altitude":  f.Alt,
	}
}

func (s *Simulator) fleetupLastLocation(w http.ResponseWriter, _ *http.Request, _ int64, _ map[string]json.RawMessage) {
	now := s.now()
	out := make([]map[string]any, len(s.units))
	for i, u := range s.units {
		out[i] = fleetupLocation(u, u.at(now))
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "msg": "success", "data": out})
}

// fleetupGPSData serves "Retrieve GPS data within a 24-hour time range":
// body {"devId", "startTime", "endTime"}, times as Unix seconds (numbers or
// strings); ranges over 24 h get 422. Answers a bare array, or 204 when
// there is nothing in the range.
func (s *Simulator) fleetupGPSData(w http.ResponseWriter, _ *http.Request, _ int64, body map[string]json.RawMessage) {
	u, ok := s.bodyDevice(w, body)
	if !ok {
		return
	}
	from, err1 := unixField(body["startTime"])
	to, err2 := unixField(body["endTime"])
	if err1 != nil || err2 != nil || to.Before(from) {
		fleetupError(w, http.StatusUnprocessableEntity, "startTime and endTime must be Unix seconds, startTime <= endTime")
		return
	}
	if to.Sub(from) > 24*time.Hour {
		fleetupError(w, http.StatusUnprocessableEntity, "time range exceeds 24 hours")
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
		out[i] = fleetupLocation(u, f)
	}
	writeJSON(w, http.StatusOK, out)
}

// fleetupTrips serves /trips/history: body {"devId", "startDate", "endDate"}
// as YYYYMMDD (UTC), both days inclusive, at most 30 days.
func (s *Simulator) fleetupTrips(w http.ResponseWriter, _ *http.Request, _ int64, body map[string]json.RawMessage) {
	u, ok := s.bodyDevice(w, body)
	if !ok {
		return
	}
	start, err1 := dateField(body["startDate"])
	end, err2 := dateField(body["endDate"])
	if err1 != nil || err2 != nil || end.Before(start) {
		fleetupError(w, http.StatusUnprocessableEntity, "startDate and endDate must be YYYYMMDD, startDate <= endDate")
		return
	}
	if end.Sub(start) >= 30*24*time.Hour {
		fleetupError(w, http.StatusUnprocessableEntity, "date range exceeds 30 days")
		return
	}
	to := end.Add(24 * time.Hour)
	if now := s.now(); to.After(now) {
		to = now
	}
	trips := []map[string]any{}
	for _, t := range u.trips(start, to) {
		trips = append(trips, map[string]any{
			"devId":     u.DevID,
			"startTime": t.From.T.Unix() * 1000, // epoch milliseconds, unlike /gpsdata
			"endTime":   t.To.T.Unix() * 1000,
			"startLat":  t.From.Lat, "startLng": t.From.Lon,
			"endLat": t.To.Lat, "endLng": t.To.Lon,
			"mileage": t.Metres / 1000, // kilometres
		})
	}
	writeJSON(w, http.StatusOK, map[string]any{"code": 0, "trips": trips})
}

func (s *Simulator) bodyDevice(w http.ResponseWriter, body map[string]json.RawMessage) (unit, bool) {
	var id string
	if err := json.Unmarshal(body["devId"], &id); err != nil || id == "" {
		fleetupError(w, http.StatusUnprocessableEntity, "devId is required")
		return unit{}, false
	}
	u, ok := s.unitByDevID(id)
	if !ok {
		fleetupError(w, http.StatusNotFound, "device not found")
		return unit{}, false
	}
	return u, true
}

func unixField(raw json.RawMessage) (time.Time, error) {
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		return time.Time{}, err
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil {
		return time.Time{}, err
	}
	return time.Unix(v, 0), nil
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
