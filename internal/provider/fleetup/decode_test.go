package fleetup

import (
	"encoding/base64"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

func jwtWith(payload string) string {
	return "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + base64.RawURLEncoding.EncodeToString([]byte(payload)) + ".c2ln"
}

func TestJWTExpiry(t *testing.T) {
	// FleetUp's documented example token, exp 1740636752.
	const doc = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzZXNzaW9uSW5mbyI6eyJhY2NvdW50SWQiOjE2ODE2LCJyb2xlVHlwZSI6MiwiY2xpZW50QWRtaW5JZCI6MzUwMDgsImNsaWVudEFkbWluTGFuZyI6MSwibG9jYWxlIjoiZW5fVVMiLCJvcGVyYXRvcklkIjpudWxsfSwic3ViIjoiRmxlZXRVcCBPcGVuQVBJIiwiaXNzIjoiRmxlZXRVcCIsImV4cCI6MTc0MDYzNjc1MiwiaWF0IjoxNzQwNjMzMTUyfQ.55h5E0ZHCmODAGjeDQidJqSi-2G8ky_oNLvwhWVPBmA"
	tests := []struct {
		name    string
		jwt     string
		want    time.Time
		wantErr string
	}{
		{name: "FleetUp doc example", jwt: doc, want: time.Unix(1740636752, 0).UTC()},
		{name: "fractional", jwt: jwtWith(`{"exp":1700000000.5}`), want: time.Unix(1700000000, 5e8).UTC()},
		{name: "padded payload", jwt: strings.Replace(jwtWith(`{"exp":1}`), ".c2ln", "==.c2ln", 1), want: time.Unix(1, 0).UTC()},
		{name: "exponent form", jwt: jwtWith(`{"exp":1.7e9}`), want: time.Unix(1700000000, 0).UTC()},
		{name: "no exp", jwt: jwtWith(`{"iat":1}`), wantErr: "no exp"},
		{name: "exp null", jwt: jwtWith(`{"exp":null}`), wantErr: "no exp"},
		{name: "exp string", jwt: jwtWith(`{"exp":"1700000000"}`), wantErr: "numeric exp"},
		{name: "exp zero", jwt: jwtWith(`{"exp":0}`), wantErr: "out of range"},
		{name: "exp negative", jwt: jwtWith(`{"exp":-5}`), wantErr: "out of range"},
		{name: "exp huge", jwt: jwtWith(`{"exp":1e300}`), wantErr: "out of range"},
		{name: "payload array", jwt: jwtWith(`[1]`), wantErr: "not a JSON object"},
		{name: "payload not base64", jwt: "a.!!!.c", wantErr: "not base64url"},
		{name: "two parts", jwt: "a.b", wantErr: "three parts"},
		{name: "four parts", jwt: "a.b.c.d", wantErr: "three parts"},
		{name: "empty", jwt: "", wantErr: "three parts"},
		{name: "too long", jwt: strings.Repeat("a", maxJWT+1), wantErr: "implausibly long"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := JWTExpiry(tt.jwt)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !got.Equal(tt.want) {
				t.Fatalf("JWTExpiry = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

// FuzzJWTExpiry: no input panics, an accepted token has a sane expiry, and
// an error never quotes the token.
func FuzzJWTExpiry(f *testing.F) {
	for _, s := range []string{
		jwtWith(`{"exp":1740636752}`), jwtWith(`{"exp":1.5}`), jwtWith(`{"exp":"x"}`), jwtWith(`null`),
		"a.b.c", "..", "", "a.e30.b", "x.eyJleHAiOjF9", "x.eyJleHAiOjF9.y.z",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, jwt string) {
		exp, err := JWTExpiry(jwt)
		if err != nil {
			if len(jwt) >= 8 && strings.Contains(err.Error(), jwt) {
				t.Fatalf("error quotes the token: %v", err)
			}
			for _, part := range strings.Split(jwt, ".") {
				if len(part) >= 8 && strings.Contains(err.Error(), part) {
					t.Fatalf("error quotes part of the token: %v", err)
				}
			}
			return
		}
		if exp.IsZero() || exp.Year() >= 10000 || exp.Unix() <= 0 {
			t.Fatalf("accepted implausible expiry %v", exp)
		}
	})
}

func TestDecodeLocations(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		dev     string
		want    []Location
		wantErr string
	}{
		{
			name: "data envelope, string time",
			body: `{"code":0,"data":[{"devId":"D1","lat":30.1,"lng":-97.7,"speed":42,"direction":90,"tmGps":"2025-03-01 12:00:00"}]}`,
			want: []Location{{DeviceID: "D1", Time: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Lat: 30.1, Lon: -97.7, Speed: 42, Heading: 90}},
		},
		{
			name: "bare array, epoch millis, numeric strings, default device",
			body: `[{"latitude":"1.5","longitude":"2.5","gpsTime":1740636752000,"heading":"180"}]`,
			dev:  "D2",
			want: []Location{{DeviceID: "D2", Time: time.Unix(1740636752, 0).UTC(), Lat: 1.5, Lon: 2.5, Heading: 180}},
		},
		{
			name: "epoch seconds as string, numeric device id",
			body: `{"data":[{"devId":123,"lat":0,"lng":0,"time":"1740636752"}]}`,
			want: []Location{{DeviceID: "123", Time: time.Unix(1740636752, 0).UTC()}},
		},
		{name: "RFC 3339", body: `[{"devId":"a","lat":1,"lng":1,"time":"2025-03-01T12:00:00+02:00"}]`,
			want: []Location{{DeviceID: "a", Time: time.Date(2025, 3, 1, 10, 0, 0, 0, time.UTC), Lat: 1, Lon: 1}}},
		{name: "nulls are missing", body: `[{"devId":"a","lat":1,"lng":1,"speed":null,"tmGps":null}]`, want: []Location{{DeviceID: "a", Lat: 1, Lon: 1}}},
		{name: "data null", body: `{"data":null}`, want: nil},
		{name: "empty body", body: ``, want: nil},
		{name: "no lat", body: `[{"devId":"a","lng":1}]`, wantErr: "record 0: no valid lat"},
		{name: "milliarcseconds (unverified unit)", body: `[{"devId":"a","lat":188892000,"lng":-351867600}]`,
			want: []Location{{DeviceID: "a", Lat: 52.47, Lon: -97.741}}},
		{name: "out of range in degrees and milliarcseconds", body: `[{"devId":"a","lat":400000000,"lng":1}]`, wantErr: "no valid lat/lng"},
		{name: "YYYYMMDDHHMMSS number", body: `[{"devId":"a","lat":1,"lng":1,"tmGps":20250301120000}]`,
			want: []Location{{DeviceID: "a", Time: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Lat: 1, Lon: 1}}},
		{name: "YYYYMMDDHHMMSS string", body: `[{"devId":"a","lat":1,"lng":1,"tmGps":"20250301120000"}]`,
			want: []Location{{DeviceID: "a", Time: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Lat: 1, Lon: 1}}},
		{name: "lat wrong type", body: `[{"devId":"a","lat":{"v":1},"lng":1}]`, wantErr: `field "lat" is not a number`},
		{name: "no device anywhere", body: `[{"lat":1,"lng":1}]`, wantErr: "no device id"},
		{name: "bad time", body: `[{"devId":"a","lat":1,"lng":1,"tmGps":"yesterday"}]`, wantErr: `field "tmGps" is not a time`},
		{name: "negative epoch", body: `[{"devId":"a","lat":1,"lng":1,"tmGps":-1}]`, wantErr: "is not a time"},
		{name: "element not object", body: `[1]`, wantErr: "element 0 is not an object"},
		{name: "no list", body: `{"code":0,"msg":"ok"}`, wantErr: "no data list"},
		{name: "scalar", body: `42`, wantErr: "not a JSON object or array"},
		{name: "too deep", body: `{"data":{"data":{"data":[]}}}`, wantErr: "nests too deep"},
		{name: "truncated", body: `{"data":[`, wantErr: "invalid JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeLocations([]byte(tt.body), tt.dev)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("location %d = %+v, want %+v", i, got[i], tt.want[i])
				}
			}
		})
	}
}

// TestDecodeTrips holds the decoder to the /trips/history shape of
// upstream-facts.md: "trips", YYYYMMDDHHMMSS UTC, "lat,lng" milliarcseconds,
// tripMileage metres, fuelWear centilitres.
func TestDecodeTrips(t *testing.T) {
	utc := func(s string) time.Time {
		tm, err := time.Parse("20060102150405", s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	tests := []struct {
		name    string
		body    string
		want    []Trip
		wantErr string
	}{
		{
			name: "documented shape",
			body: `{"code":0,"trips":[{"devId":"D1","startTime":"20250227061500","endTime":"20250227065500",
				"startLocation":"188892000,48258000","endLocation":"-4651560,132558840","tripMileage":12345,"fuelWear":250,
				"tripScore":87,"startAddress":"a","endAddress":"b"}]}`,
			want: []Trip{{DeviceID: "D1",
				From:      provider.TripEnd{Time: utc("20250227061500"), Lat: 52.47, Lon: 13.405},
				To:        provider.TripEnd{Time: utc("20250227065500"), Lat: -1.2921, Lon: 36.8219},
				DistanceM: 12345, FuelL: 2.5, FuelKnown: true}},
		},
		{
			name: "numbers as strings, numeric times, no location or fuel, default device",
			body: `{"trips":[{"startTime":20250227061500,"endTime":"20250227065500","tripMileage":"3000","startLocation":""}]}`,
			want: []Trip{{DeviceID: "DEF", From: provider.TripEnd{Time: utc("20250227061500")}, To: provider.TripEnd{Time: utc("20250227065500")}, DistanceM: 3000}},
		},
		{name: "empty trips", body: `{"trips":[]}`, want: []Trip{}},
		{name: "no start", body: `{"trips":[{"endTime":"20250227065500"}]}`, wantErr: "no start time"},
		{name: "no end", body: `{"trips":[{"startTime":"20250227065500"}]}`, wantErr: "no end time"},
		{name: "mileage not a number", body: `[{"startTime":"20250227061500","endTime":"20250227065500","tripMileage":[]}]`, wantErr: `field "tripMileage" is not a number`},
		{name: "negative mileage", body: `[{"startTime":"20250227061500","endTime":"20250227065500","tripMileage":-1}]`, wantErr: "valid tripMileage"},
		{name: "location in degrees", body: `[{"startTime":"20250227061500","endTime":"20250227065500","startLocation":"52.47,13.405x"}]`, wantErr: "milliarcseconds"},
		{name: "location out of range", body: `[{"startTime":"20250227061500","endTime":"20250227065500","startLocation":"400000000,0"}]`, wantErr: "milliarcseconds"},
		{name: "location one number", body: `[{"startTime":"20250227061500","endTime":"20250227065500","endLocation":"188892000"}]`, wantErr: "milliarcseconds"},
		{name: "location an object", body: `[{"startTime":"20250227061500","endTime":"20250227065500","endLocation":{"lat":1}}]`, wantErr: "lat,lng"},
		{name: "trips an object", body: `{"trips":{}}`, wantErr: "no data list"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeTrips([]byte(tt.body), "DEF")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("trips = %+v\nwant %+v", got, tt.want)
			}
			for i := range got {
				g, w := got[i], tt.want[i]
				const eps = 1e-9
				if g.DeviceID != w.DeviceID || !g.From.Time.Equal(w.From.Time) || !g.To.Time.Equal(w.To.Time) ||
					math.Abs(g.From.Lat-w.From.Lat) > eps || math.Abs(g.From.Lon-w.From.Lon) > eps ||
					math.Abs(g.To.Lat-w.To.Lat) > eps || math.Abs(g.To.Lon-w.To.Lon) > eps ||
					g.DistanceM != w.DistanceM || g.FuelL != w.FuelL || g.FuelKnown != w.FuelKnown {
					t.Errorf("trip %d = %+v\nwant %+v", i, g, w)
				}
			}
		})
	}
}

// FuzzDecodeResponse feeds arbitrary replies to every decoder: none may
// panic, and a refusal is a short KindInternal error that does not quote the
// reply.
func FuzzDecodeResponse(f *testing.F) {
	for _, s := range []string{
		`{"code":0,"data":[{"devId":"SIM000001","devName":"Sim Truck 001","acctId":12345}]}`,
		`{"data":[{"devId":"D","lat":30.1,"lng":-97.7,"speed":42,"direction":90,"tmGps":"2025-03-01 12:00:00"}]}`,
		`[{"devId":"D","lat":"1","lng":"2","tmGps":1740636752000}]`,
		`{"trips":[{"devId":"D","startTime":"20250227061500","endTime":"20250227065500","startLocation":"188892000,48258000","tripMileage":1500,"fuelWear":15}]}`,
		`{"data":{"list":[{"id":1}]}}`, `{"data":null}`, `null`, `[]`, `[null]`, `{}`, `"x"`, `[{"devId":{}}]`,
		`{"data":[{"devId":"CANARY-secret-value-in-reply","lat":999}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		check := func(name string, err error) {
			if err == nil {
				return
			}
			wrapped := malformed("POST /x", err)
			if upstream.KindOf(wrapped) != upstream.KindInternal {
				t.Fatalf("%s: kind %v", name, upstream.KindOf(wrapped))
			}
			if n := len(wrapped.Error()); n > 300 {
				t.Fatalf("%s: error text is %d bytes", name, n)
			}
			if strings.Contains(wrapped.Error(), "CANARY-secret-value-in-reply") ||
				(len(body) >= 16 && strings.Contains(wrapped.Error(), string(body))) {
				t.Fatalf("%s: error quotes the reply: %v", name, wrapped)
			}
		}
		_, err := decodeDevices(body)
		check("devices", err)
		_, err = decodeLocations(body, "dev")
		check("locations", err)
		_, err = decodeTrips(body, "dev")
		check("trips", err)
		if r := scrub(reason(body), []string{"CANARY-secret-value-in-reply"}); strings.Contains(r, "CANARY-secret-value-in-reply") || len([]rune(r)) > 201 {
			t.Fatalf("reason %q", r)
		}
	})
}

// The claims read besides exp: iat (how old a token is) and
// sessionInfo.accountId (whose budget its calls take). Odd values of either
// leave exp usable.
func TestJWTClaims(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		iat     time.Time
		account int64
	}{
		{"FleetUp's documented shape", `{"sessionInfo":{"accountId":16816,"roleType":2},"exp":1740636752,"iat":1740633152}`, time.Unix(1740633152, 0).UTC(), 16816},
		{"no iat, no session info", `{"exp":1740636752}`, time.Time{}, 0},
		{"account id as a string", `{"sessionInfo":{"accountId":"16816"},"exp":1740636752}`, time.Time{}, 0},
		{"session info not an object", `{"sessionInfo":"x","exp":1740636752,"iat":"soon"}`, time.Time{}, 0},
		{"negative account, iat zero", `{"sessionInfo":{"accountId":-1},"exp":1740636752,"iat":0}`, time.Time{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseClaims(jwtWith(tt.payload))
			if err != nil || !c.Exp.Equal(time.Unix(1740636752, 0)) {
				t.Fatalf("claims %+v, %v: exp must stay readable", c, err)
			}
			if !c.Iat.Equal(tt.iat) || c.AccountID != tt.account {
				t.Errorf("iat %v account %d, want %v and %d", c.Iat, c.AccountID, tt.iat, tt.account)
			}
		})
	}
	if at, ok := issuedAt(jwtWith(`{"exp":1740636752}`)); !ok || !at.Equal(time.Unix(1740636752-3600, 0)) {
		t.Errorf("issuedAt without iat = %v, %v; want exp minus an hour", at, ok)
	}
}
