package wialon

import (
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

func TestDecodeUnits(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		want    []Unit
		wantErr string
	}{
		{
			name: "with and without position",
			body: `{"totalItemsCount":2,"items":[
				{"id":34868,"nm":"Bavarian Tractor","pos":{"t":1358761631,"y":53.92,"x":27.49,"z":238,"s":12,"c":102,"sc":10}},
				{"id":2,"nm":"Parked","pos":null}]}`,
			want: []Unit{
				{ID: 34868, Name: "Bavarian Tractor", Pos: &Position{Time: time.Unix(1358761631, 0).UTC(), Lat: 53.92, Lon: 27.49, Altitude: 238, Speed: 12, Course: 102, Satellites: 10}},
				{ID: 2, Name: "Parked"},
			},
		},
		{name: "empty", body: `{"items":[]}`, want: []Unit{}},
		{name: "missing position time", body: `{"items":[{"id":1,"pos":{"y":1,"x":2}}]}`, want: []Unit{{ID: 1, Pos: &Position{Lat: 1, Lon: 2}}}},
		{name: "no items", body: `{"totalItemsCount":0}`, wantErr: "no items"},
		{name: "items null", body: `{"items":null}`, wantErr: "no items"},
		{name: "id missing", body: `{"items":[{"nm":"x"}]}`, wantErr: "no id"},
		{name: "id is string", body: `{"items":[{"id":"34868"}]}`, wantErr: `field "items.id": got JSON string, want int64`},
		{name: "id fractional", body: `{"items":[{"id":1.5}]}`, wantErr: "got JSON number"},
		{name: "pos without lat", body: `{"items":[{"id":1,"pos":{"x":2}}]}`, wantErr: "position without y/x"},
		{name: "pos wrong type", body: `{"items":[{"id":1,"pos":[1,2]}]}`, wantErr: "got JSON array"},
		{name: "not an object", body: `[1,2]`, wantErr: "got JSON array"},
		{name: "truncated", body: `{"items":[`, wantErr: "invalid JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeUnits([]byte(tt.body))
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
				t.Fatalf("got %d units, want %d", len(got), len(tt.want))
			}
			for i := range got {
				g, w := got[i], tt.want[i]
				if g.ID != w.ID || g.Name != w.Name || (g.Pos == nil) != (w.Pos == nil) || (g.Pos != nil && *g.Pos != *w.Pos) {
					t.Errorf("unit %d = %+v (pos %+v), want %+v (pos %+v)", i, g, g.Pos, w, w.Pos)
				}
			}
		})
	}
}

func TestDecodeError(t *testing.T) {
	tests := []struct {
		body       string
		code       int
		reason     string
		isErr, bad bool
	}{
		{body: `{"error":1}`, code: 1, isErr: true},
		{body: ` {"error":1003,"reason":"LIMIT api_concurrent"}`, code: 1003, reason: "LIMIT api_concurrent", isErr: true},
		{body: `{"error":0}`, code: 0, isErr: true},
		{body: `{"error":7,"reason":{"x":1}}`, code: 7, isErr: true},
		{body: `{"items":[]}`},
		{body: `[]`},
		{body: `{"error":"1"}`, bad: true},
		{body: `{"error":1.5}`, bad: true},
		{body: `oops`, bad: true},
		{body: ``, bad: true},
	}
	for _, tt := range tests {
		code, reason, isErr, err := decodeError([]byte(tt.body))
		if (err != nil) != tt.bad || code != tt.code || reason != tt.reason || isErr != tt.isErr {
			t.Errorf("decodeError(%s) = %d, %q, %v, %v", tt.body, code, reason, isErr, err)
		}
	}
}

func TestDecodeMessagesAndTrips(t *testing.T) {
	msgs, total, err := decodeMessages([]byte(`{"count":7,"messages":[
		{"t":1364760081,"f":3,"tp":"ud","pos":{"y":53.8,"x":27.5,"z":213,"s":0,"c":51,"sc":9},"i":0,"p":{"adc1":12.6}},
		{"t":1364760381,"tp":"ud","pos":null,"p":null}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[0].Pos == nil || msgs[0].Pos.Time.Unix() != 1364760081 || string(msgs[0].Params) != `{"adc1":12.6}` ||
		msgs[1].Pos != nil || msgs[1].Params != nil || total != 7 {
		t.Errorf("messages = %+v, count %d", msgs, total)
	}
	if _, _, err := decodeMessages([]byte(`{"messages":[{"tp":"ud"}]}`)); err == nil || !strings.Contains(err.Error(), "no time") {
		t.Errorf("message without time: %v", err)
	}

	trips, err := decodeTrips([]byte(`[{"from":{"i":0,"t":100,"p":{"y":1,"x":2}},"to":{"i":5,"t":200,"p":{"y":3,"x":4}},"m":1500.5}]`))
	if err != nil {
		t.Fatal(err)
	}
	want := Trip{From: provider.TripEnd{Time: time.Unix(100, 0).UTC(), Lat: 1, Lon: 2}, To: provider.TripEnd{Time: time.Unix(200, 0).UTC(), Lat: 3, Lon: 4}, DistanceMeters: 1500.5}
	if len(trips) != 1 || trips[0] != want {
		t.Errorf("trips = %+v, want %+v", trips, want)
	}
	for _, bad := range []string{`{"error":0}`, `[{"to":{"t":1}}]`, `[{"from":{"t":"x"},"to":{"t":1}}]`} {
		if _, err := decodeTrips([]byte(bad)); err == nil {
			t.Errorf("decodeTrips(%s) accepted", bad)
		}
	}
}

// FuzzDecodeResponse feeds arbitrary replies to every decoder. None may
// panic, and a refusal must be a short error that does not quote the reply
// (which could hold anything, including what we sent).
func FuzzDecodeResponse(f *testing.F) {
	for _, seed := range []string{
		`{"eid":"d1cb60897768780f846df7ab2400eb5f","au":"wialon_test","user":{"nm":"wialon_test","id":50935}}`,
		`{"searchSpec":{},"dataFlags":1025,"totalItemsCount":1,"items":[{"nm":"T","cls":2,"id":34868,"pos":{"t":1358761631,"y":53.9,"x":27.4,"z":238,"s":0,"c":102,"sc":10}}]}`,
		`{"count":1,"messages":[{"t":1364760081,"f":3,"tp":"ud","pos":{"y":53.8,"x":27.5,"z":213,"s":0,"c":51,"sc":9},"i":0,"p":{}}]}`,
		`[{"from":{"i":0,"t":1,"p":{"y":1,"x":2}},"to":{"i":1,"t":2,"p":{"y":1,"x":2}},"m":10}]`,
		`{"error":1003,"reason":"LIMIT api_concurrent"}`,
		`{"error":"x"}`,
		`{"items":[{"id":9223372036854775807,"pos":{"t":-1,"y":1e308,"x":-1e308,"sc":2147483647}}]}`,
		`{"messages":[{"t":1,"pos":{"y":1,"x":1},"p":"CANARY-secret-value-in-reply"}]}`,
		`null`, `[]`, `{}`, `"`, `{"items":[null]}`, `{"messages":[null]}`, `[null]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		check := func(name string, err error) {
			if err == nil {
				return
			}
			wrapped := malformed("svc", err) // as the client reports it
			if upstream.KindOf(wrapped) != upstream.KindInternal {
				t.Fatalf("%s: kind %v", name, upstream.KindOf(wrapped))
			}
			if n := len(wrapped.Error()); n > 300 {
				t.Fatalf("%s: error text is %d bytes: %q", name, n, wrapped.Error())
			}
			if len(body) >= 16 && strings.Contains(wrapped.Error(), string(body)) {
				t.Fatalf("%s: error quotes the reply", name)
			}
		}
		_, err := decodeLogin(body)
		check("login", err)
		_, err = decodeUnits(body)
		check("units", err)
		_, _, err = decodeMessages(body)
		check("messages", err)
		_, err = decodeTrips(body)
		check("trips", err)
		_, reason, _, err := decodeError(body)
		check("error", err)
		if s := scrub(reason, []string{"CANARY-secret-value-in-reply"}); len([]rune(s)) > 201 || strings.Contains(s, "CANARY-secret-value-in-reply") {
			t.Fatalf("scrubbed reason %q", s)
		}
	})
}
