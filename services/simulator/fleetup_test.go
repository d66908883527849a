package simulator

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fleetupReq sends a FleetUp request with any headers.
func fleetupReq(t *testing.T, srv *httptest.Server, method, path string, header map[string]string, body string) fuReply {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fuReply{resp.StatusCode, resp.Header, buf}
}

// The trip shape of upstream-facts.md (FleetUp /trips/history): wrapped in
// "trips", times YYYYMMDDHHMMSS UTC, locations "lat,lng" in milliarcseconds,
// tripMileage in metres, fuelWear in centilitres — and every value the
// fleet's truth, converted by those units.
func TestFleetUpTripShape(t *testing.T) {
	clk := newClock() // 2025-03-01 12:00 UTC
	sim, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 3})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	u := sim.units[2]
	r := fleetup(t, srv, "/trips/history", DemoFleetUpAPIKey, jwt, `{"acctId":12345,"devId":"`+u.DevID+`","startDate":"20250228","endDate":"20250301"}`)
	if r.status != http.StatusOK {
		t.Fatalf("HTTP %d %s", r.status, r.body)
	}
	var reply map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &reply); err != nil {
		t.Fatal(err)
	}
	if _, ok := reply["data"]; ok {
		t.Errorf("trips reply has a data key; FleetUp wraps trips in \"trips\"")
	}
	var trips []map[string]any
	if err := json.Unmarshal(reply["trips"], &trips); err != nil {
		t.Fatalf("no trips list: %s", r.body)
	}
	// One 40-minute trip an hour from 2025-02-28 00:00 until the last one
	// that ended by noon on 2025-03-01: 35 or 36 of them.
	if len(trips) < 35 || len(trips) > 36 {
		t.Fatalf("%d trips in a day and a half, want 35 or 36", len(trips))
	}
	speed := 2 * math.Pi * u.radius / u.lap.Seconds()
	for i, tr := range trips {
		startTime, err1 := time.Parse("20060102150405", tr["startTime"].(string))
		endTime, err2 := time.Parse("20060102150405", tr["endTime"].(string))
		if err1 != nil || err2 != nil {
			t.Fatalf("trip %d times %v / %v are not YYYYMMDDHHMMSS", i, tr["startTime"], tr["endTime"])
		}
		if startTime.Before(time.Date(2025, 2, 28, 0, 0, 0, 0, time.UTC)) || endTime.After(clk.Now()) || endTime.Sub(startTime) != driveTime {
			t.Fatalf("trip %d %v–%v: not a whole trip started in the range and ended by now", i, startTime, endTime)
		}
		for _, end := range []struct {
			field string
			at    time.Time
		}{{"startLocation", startTime}, {"endLocation", endTime}} {
			want := u.at(end.at)
			if got, wantStr := tr[end.field], fmt.Sprintf("%d,%d", mas(want.Lat), mas(want.Lon)); got != wantStr {
				t.Fatalf("trip %d %s = %v, want %q (milliarcseconds)", i, end.field, got, wantStr)
			}
		}
		metres := math.Round(speed * driveTime.Seconds())
		if got := tr["tripMileage"].(float64); got != metres || got < 1000 || got > 100_000 {
			t.Fatalf("trip %d tripMileage = %v, want %v metres", i, got, metres)
		}
		if got := tr["fuelWear"].(float64); got != math.Round(metres/100) {
			t.Fatalf("trip %d fuelWear = %v, want %v centilitres", i, got, math.Round(metres/100))
		}
		if tr["devId"] != u.DevID || tr["tripScore"] == nil || tr["startAddress"] == "" || tr["endAddress"] == "" {
			t.Fatalf("trip %d lacks a field: %v", i, tr)
		}
	}
}

func TestFleetUpTripRange(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	tests := []struct {
		name, start, end string
		status           int
	}{
		{"one day", "20250301", "20250301", 200},
		{"30 days, both inclusive", "20250130", "20250228", 200},
		{"31 days", "20250129", "20250228", 400},
		{"a year", "20240301", "20250301", 400},
		{"numeric dates", "20250301", "20250301", 200},
		{"reversed", "20250302", "20250301", 400},
		{"dashed", "2025-03-01", "2025-03-01", 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := `{"devId":"SIM000001","startDate":"` + tt.start + `","endDate":"` + tt.end + `"}`
			if tt.name == "numeric dates" {
				body = `{"devId":"SIM000001","startDate":` + tt.start + `,"endDate":` + tt.end + `}`
			}
			if r := fleetup(t, srv, "/trips/history", DemoFleetUpAPIKey, jwt, body); r.status != tt.status {
				t.Fatalf("HTTP %d %s, want %d", r.status, r.body, tt.status)
			}
		})
	}
}

// The JWT travels as Authorization: Bearer (FleetUp's docs) or as a
// "token" header (production clients); two different ones are refused.
func TestFleetUpJWTHeaders(t *testing.T) {
	sim, srv := start(t, Config{Demo: true, Units: 1})
	sim.AddFleetUpAccount("other-key", 777, "other-secret")
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	other := mint(t, srv, "other-key", 777, "other-secret")
	tests := []struct {
		name   string
		header map[string]string
		status int
	}{
		{"bearer", map[string]string{"Authorization": "Bearer " + jwt}, 200},
		{"token header", map[string]string{"token": jwt}, 200},
		{"both, equal", map[string]string{"Authorization": "Bearer " + jwt, "token": jwt}, 200},
		{"both, different", map[string]string{"Authorization": "Bearer " + jwt, "token": other}, 401},
		{"token of another account", map[string]string{"token": other}, 401},
		{"neither", map[string]string{}, 401},
		{"empty bearer", map[string]string{"Authorization": "Bearer "}, 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := map[string]string{"x-api-key": DemoFleetUpAPIKey, "Content-Type": "application/json"}
			for k, v := range tt.header {
				h[k] = v
			}
			if r := fleetupReq(t, srv, http.MethodPost, "/devices", h, `{}`); r.status != tt.status {
				t.Fatalf("HTTP %d, want %d", r.status, tt.status)
			}
		})
	}
}

// Production clients mint with GET /token?acctId=…&secret=…; the reply
// also carries expireTime.
func TestFleetUpTokenByGET(t *testing.T) {
	clk := newClock()
	sim, srv := start(t, Config{Demo: true, Now: clk.Now})
	h := map[string]string{"x-api-key": DemoFleetUpAPIKey}
	r := fleetupReq(t, srv, http.MethodGet, "/token?acctId=12345&secret="+DemoFleetUpSecret, h, "")
	var out struct {
		Token      string
		ExpireTime int64
	}
	if err := json.Unmarshal(r.body, &out); r.status != 200 || err != nil || out.Token == "" {
		t.Fatalf("GET /token: HTTP %d %s", r.status, r.body)
	}
	if want := clk.Now().Add(time.Hour).UnixMilli(); out.ExpireTime != want {
		t.Errorf("expireTime = %d, want %d", out.ExpireTime, want)
	}
	if r := fleetupReq(t, srv, http.MethodPost, "/devices", map[string]string{"x-api-key": DemoFleetUpAPIKey, "token": out.Token}, `{}`); r.status != 200 {
		t.Errorf("the GET-minted JWT: HTTP %d", r.status)
	}
	for _, q := range []string{"acctId=12345&secret=wrong", "acctId=777&secret=" + DemoFleetUpSecret, "secret=" + DemoFleetUpSecret} {
		if r := fleetupReq(t, srv, http.MethodGet, "/token?"+q, h, ""); r.status != 401 {
			t.Errorf("GET /token?%s: HTTP %d, want 401", q, r.status)
		}
	}
	if got := sim.Stats().FleetUpMints; got != 1 {
		t.Errorf("mints = %d, want 1", got)
	}
}

// /gpsdata's time encoding is unverified: every plausible one is read, and
// a range over 24 hours is refused.
func TestFleetUpGPSDataTimeEncodings(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	to := clk.Now()
	from := to.Add(-time.Hour)
	q := func(v string) string { return `"` + v + `"` }
	tests := []struct {
		name       string
		start, end string
		status     int
	}{
		{"YYYYMMDDHHMMSS string", q(from.Format("20060102150405")), q(to.Format("20060102150405")), 200},
		{"YYYYMMDDHHMMSS number", from.Format("20060102150405"), to.Format("20060102150405"), 200},
		{"Unix seconds", strconv.FormatInt(from.Unix(), 10), strconv.FormatInt(to.Unix(), 10), 200},
		{"Unix seconds as strings", q(strconv.FormatInt(from.Unix(), 10)), q(strconv.FormatInt(to.Unix(), 10)), 200},
		{"Unix milliseconds", strconv.FormatInt(from.UnixMilli(), 10), strconv.FormatInt(to.UnixMilli(), 10), 200},
		{"date and time", q(from.Format("2006-01-02 15:04:05")), q(to.Format("2006-01-02 15:04:05")), 200},
		{"RFC 3339", q(from.Format(time.RFC3339)), q(to.Format(time.RFC3339)), 200},
		{"exactly 24 hours", q(to.Add(-24 * time.Hour).Format("20060102150405")), q(to.Format("20060102150405")), 200},
		{"24 hours and a second", q(to.Add(-24*time.Hour - time.Second).Format("20060102150405")), q(to.Format("20060102150405")), 400},
		{"garbage", q("yesterday"), q("today"), 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := fleetup(t, srv, "/gpsdata", DemoFleetUpAPIKey, jwt, `{"devId":"SIM000001","startTime":`+tt.start+`,"endTime":`+tt.end+`}`)
			if r.status != tt.status {
				t.Fatalf("HTTP %d %s, want %d", r.status, r.body, tt.status)
			}
			if tt.status == 200 && !strings.Contains(tt.name, "24") {
				var fixes []map[string]any
				if err := json.Unmarshal(r.body, &fixes); err != nil || len(fixes) != 61 {
					t.Fatalf("an hour of fixes: %d, %v", len(fixes), err)
				}
			}
		})
	}
}

// Enterprise accounts on JWT may use only /devices and /gpsdata/* (FleetUp's
// docs); the simulator refuses the rest with the status a test picks.
func TestFleetUpRestrictedAccount(t *testing.T) {
	for _, status := range []int{http.StatusUnauthorized, http.StatusForbidden} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			clk := newClock()
			sim, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1})
			sim.RestrictFleetUpAccount(DemoFleetUpAccountID, status)
			jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
			now := clk.Now().Unix()
			for path, want := range map[string]int{
				"/devices":                      200,
				"/gpsdata/device-last-location": 200,
				"/gpsdata":                      200,
				"/trips/history":                status,
			} {
				body := fmt.Sprintf(`{"devId":"SIM000001","startTime":%d,"endTime":%d,"startDate":"20250301","endDate":"20250301"}`, now-60, now)
				if r := fleetup(t, srv, path, DemoFleetUpAPIKey, jwt, body); r.status != want {
					t.Errorf("%s: HTTP %d, want %d", path, r.status, want)
				}
			}
			sim.RestrictFleetUpAccount(DemoFleetUpAccountID, 0)
			if r := fleetup(t, srv, "/trips/history", DemoFleetUpAPIKey, jwt, `{"devId":"SIM000001","startDate":"20250301","endDate":"20250301"}`); r.status != 200 {
				t.Errorf("lifted restriction: HTTP %d", r.status)
			}
		})
	}
}

// With FleetUpAccountRate the simulator answers 429 with a Retry-After past
// each account's budget, mints included; other accounts are not affected.
func TestFleetUpAccountRate(t *testing.T) {
	clk := newClock()
	sim, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1, FleetUpAccountRate: 0.5, FleetUpAccountBurst: 2})
	sim.AddFleetUpAccount("other-key", 777, "other-secret")
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret) // 1 of 2
	if r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`); r.status != 200 {
		t.Fatalf("2 of 2: HTTP %d", r.status)
	}
	r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`)
	if r.status != http.StatusTooManyRequests || r.header.Get("Retry-After") != "2" {
		t.Fatalf("over the budget: HTTP %d, Retry-After %q; want 429 after 2 s", r.status, r.header.Get("Retry-After"))
	}
	body, _ := json.Marshal(map[string]any{"acctId": DemoFleetUpAccountID, "secret": DemoFleetUpSecret})
	if r := fleetup(t, srv, "/token", DemoFleetUpAPIKey, "", string(body)); r.status != http.StatusTooManyRequests {
		t.Errorf("a mint over the budget: HTTP %d, want 429", r.status)
	}
	mint(t, srv, "other-key", 777, "other-secret")
	clk.Advance(2 * time.Second)
	if r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, jwt, `{}`); r.status != 200 {
		t.Errorf("after Retry-After: HTTP %d", r.status)
	}
	if got := sim.Stats().FleetUpThrottled; got != 2 {
		t.Errorf("FleetUpThrottled = %d, want 2", got)
	}
}

// FleetUp's replies carry its own clock in Date, which its JWTs' iat and
// exp follow.
func TestFleetUpDateIsTheSimulatorsClock(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1})
	clk.Advance(90 * time.Minute)
	r := fleetup(t, srv, "/devices", DemoFleetUpAPIKey, "", `{}`)
	if got, err := http.ParseTime(r.header.Get("Date")); err != nil || !got.Equal(clk.Now()) {
		t.Errorf("Date = %q, want %v", r.header.Get("Date"), clk.Now())
	}
}

// The unit of lat/lng on the GPS endpoints is unverified; the simulator can
// write milliarcseconds so clients are tried with both.
func TestFleetUpLocationsInMAS(t *testing.T) {
	clk := newClock()
	sim, srv := start(t, Config{Demo: true, Now: clk.Now, Units: 1, FleetUpLocationsInMAS: true})
	jwt := mint(t, srv, DemoFleetUpAPIKey, DemoFleetUpAccountID, DemoFleetUpSecret)
	var last struct{ Data []struct{ Lat, Lng float64 } }
	r := fleetup(t, srv, "/gpsdata/device-last-location", DemoFleetUpAPIKey, jwt, `{}`)
	if err := json.Unmarshal(r.body, &last); err != nil || len(last.Data) != 1 {
		t.Fatalf("%s: %v", r.body, err)
	}
	want := sim.units[0].at(clk.Now())
	if last.Data[0].Lat != float64(mas(want.Lat)) || last.Data[0].Lng != float64(mas(want.Lon)) {
		t.Errorf("lat/lng = %v/%v, want %d/%d milliarcseconds", last.Data[0].Lat, last.Data[0].Lng, mas(want.Lat), mas(want.Lon))
	}
}
