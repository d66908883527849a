package simulator

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// concurrently sends n requests of svc at once in session sid and returns
// the error numbers they got (0 for success).
func concurrently(t *testing.T, srvURL string, n int, svc, params, sid string) []int {
	t.Helper()
	codes := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.PostForm(srvURL+"/wialon/ajax.html", url.Values{"svc": {svc}, "params": {params}, "sid": {sid}})
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var v any
			if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
				t.Error(err)
				return
			}
			if m, ok := v.(map[string]any); ok {
				if e, ok := m["error"].(float64); ok {
					codes[i] = int(e)
				}
			}
		}()
	}
	wg.Wait()
	return codes
}

func count(codes []int, code int) int {
	n := 0
	for _, c := range codes {
		if c == code {
			n++
		}
	}
	return n
}

// Wialon serves at most 10 requests and 3 heavy ones at once per session,
// and answers the rest 1003 (upstream-facts.md, "Limits").
func TestWialonSessionConcurrencyLimits(t *testing.T) {
	tests := []struct {
		name        string
		n           int
		svc, params string
		wantOK      int
		wantPeak    func(Stats) int
	}{
		{"requests", 14, "core/search_items", `{"spec":{"itemsType":"avl_unit"},"flags":1}`, 10, func(s Stats) int { return s.WialonPeakRequests }},
		{"heavy", 6, "unit/get_trips", `{"itemId":10001,"timeFrom":0,"timeTo":3600}`, 3, func(s Stats) int { return s.WialonPeakHeavy }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sim, srv := start(t, Config{Demo: true, Latency: 300 * time.Millisecond})
			sid := login(t, srv, DemoWialonToken)
			codes := concurrently(t, srv.URL, tt.n, tt.svc, tt.params, sid)
			if got := count(codes, 0); got != tt.wantOK {
				t.Errorf("%d of %d succeeded (%v), want %d", got, tt.n, codes, tt.wantOK)
			}
			if got := count(codes, 1003); got != tt.n-tt.wantOK {
				t.Errorf("%d answered 1003, want %d", got, tt.n-tt.wantOK)
			}
			st := sim.Stats()
			if got := tt.wantPeak(st); got != tt.wantOK {
				t.Errorf("peak = %d, want %d", got, tt.wantOK)
			}
			if st.WialonLimitErrors[reasonConcurrent] != int64(tt.n-tt.wantOK) {
				t.Errorf("limit errors = %v", st.WialonLimitErrors)
			}
			// Another session has its own limits.
			if e := wialonErr(wialon(t, srv, "core/search_items", `{"spec":{"itemsType":"avl_unit"},"flags":1}`, login(t, srv, DemoWialonToken))); e != 0 {
				t.Errorf("a second session: error %d", e)
			}
		})
	}
}

// A load into the message layer cannot run beside another layer request
// or trips in the same session.
func TestWialonMessageLayerIsExclusive(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Latency: 300 * time.Millisecond, Now: clk.Now})
	sid := login(t, srv, DemoWialonToken)
	to := clk.Now().Unix()
	load := `{"itemId":10001,"timeFrom":` + itoa(int(to-3600)) + `,"timeTo":` + itoa(int(to)) + `,"flags":1,"flagsMask":65281,"loadCount":10}`
	codes := concurrently(t, srv.URL, 2, "messages/load_interval", load, sid)
	if count(codes, 0) != 1 || count(codes, 1003) != 1 {
		t.Errorf("two loads at once: %v, want one success and one 1003", codes)
	}
}

// Logins per IP: past 10 failed or 120 successful logins a minute, or 100
// sessions of one user, the IP is blocked for a minute, good tokens too.
func TestWialonLoginLimitsBlockTheIP(t *testing.T) {
	bad := strings.Repeat("x", 72)
	tests := []struct {
		name string
		cfg  Config
		// trip makes the logins that block the IP.
		trip func(t *testing.T, srv string)
	}{
		{"failed logins", Config{}, func(t *testing.T, srv string) {
			// The 11th failed login is answered 8 and blocks the IP.
			for i := range 11 {
				if e := wialonErrURL(t, srv, "token/login", `{"token":"`+bad+`"}`, ""); e != 8 {
					t.Fatalf("failed login %d: error %d, want 8", i+1, e)
				}
			}
		}},
		{"successful logins", Config{WialonLoginsPerMinute: 5}, func(t *testing.T, srv string) {
			for i := range 5 {
				if e := wialonErrURL(t, srv, "token/login", `{"token":"`+DemoWialonToken+`"}`, ""); e != 0 {
					t.Fatalf("login %d: error %d", i+1, e)
				}
			}
			if e := wialonErrURL(t, srv, "token/login", `{"token":"`+DemoWialonToken+`"}`, ""); e != 1003 {
				t.Fatalf("login past the limit: error %d, want 1003", e)
			}
		}},
		{"sessions per user", Config{WialonSessionsPerUserIP: 3}, func(t *testing.T, srv string) {
			for range 3 {
				wialonErrURL(t, srv, "token/login", `{"token":"`+DemoWialonToken+`"}`, "")
			}
			if e := wialonErrURL(t, srv, "token/login", `{"token":"`+DemoWialonToken+`"}`, ""); e != 1003 {
				t.Fatalf("a 4th session: error %d, want 1003", e)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newClock()
			tt.cfg.Demo, tt.cfg.Now = true, clk.Now
			sim, srv := start(t, tt.cfg)
			tt.trip(t, srv.URL)
			if e := wialonErrURL(t, srv.URL, "token/login", `{"token":"`+DemoWialonToken+`"}`, ""); e != 1003 {
				t.Errorf("a good token from the blocked IP: error %d, want 1003", e)
			}
			if st := sim.Stats(); st.WialonIPBlocks != 1 || st.WialonBlockedLogins < 2 {
				t.Errorf("stats: %d blocks, %d blocked logins", st.WialonIPBlocks, st.WialonBlockedLogins)
			}
			clk.Advance(61 * time.Second)
			sim.ExpireWialonSessions()
			if e := wialonErrURL(t, srv.URL, "token/login", `{"token":"`+DemoWialonToken+`"}`, ""); e != 0 {
				t.Errorf("a minute later: error %d, want 0", e)
			}
		})
	}
}

func wialonErrURL(t *testing.T, srvURL, svc, params, sid string) int {
	t.Helper()
	resp, err := http.PostForm(srvURL+"/wialon/ajax.html", url.Values{"svc": {svc}, "params": {params}, "sid": {sid}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		return 0 // not an object: a success that answers an array
	}
	return wialonErr(m)
}

// core/batch runs its calls in order in both forms; with flags 1 the calls
// after a failure answer 10; the minting services inside work as on Wialon
// (which is why the broker's pass-through must look inside).
func TestWialonBatch(t *testing.T) {
	_, srv := start(t, Config{Demo: true})
	sid := login(t, srv, DemoWialonToken)
	batch := func(params string) []map[string]any {
		t.Helper()
		// Replies that are arrays (token/list) are kept as {"list": [...]}.
		resp, err := http.PostForm(srv.URL+"/wialon/ajax.html", url.Values{"svc": {"core/batch"}, "params": {params}, "sid": {sid}})
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var raw []any
		if err := json.NewDecoder(resp.Body).Decode(&raw); err != nil {
			t.Fatal(err)
		}
		out := make([]map[string]any, len(raw))
		for i, v := range raw {
			if m, ok := v.(map[string]any); ok {
				out[i] = m
			} else {
				out[i] = map[string]any{"list": v}
			}
		}
		return out
	}
	bare := batch(`[{"svc":"core/search_items","params":{"spec":{"itemsType":"avl_unit"},"flags":1}},{"svc":"token/list","params":{}},{"svc":"core/duplicate","params":{}}]`)
	if len(bare) != 3 || bare[0]["items"] == nil {
		t.Fatalf("bare-list batch = %v", bare)
	}
	if b, _ := json.Marshal(bare[1]); !strings.Contains(string(b), DemoWialonToken) {
		t.Errorf("token/list in a batch does not list the token: %s", b)
	}
	if eid, _ := bare[2]["eid"].(string); eid == "" || eid == sid {
		t.Errorf("core/duplicate in a batch: %v", bare[2])
	} else if e := wialonErrURL(t, srv.URL, "core/search_items", `{"spec":{"itemsType":"avl_unit"},"flags":1}`, eid); e != 0 {
		t.Errorf("the duplicated session does not work: error %d", e)
	}
	stopped := batch(`{"params":[{"svc":"no/such","params":{}},{"svc":"core/search_items","params":{}}],"flags":1}`)
	if len(stopped) != 2 || wialonErr(stopped[0]) != 2 || wialonErr(stopped[1]) != 10 {
		t.Errorf("flags 1 batch = %v, want errors 2 then 10", stopped)
	}
	going := batch(`{"params":[{"svc":"no/such","params":{}},{"svc":"core/create_auth_hash","params":{}}],"flags":0}`)
	if len(going) != 2 || wialonErr(going[0]) != 2 || going[1]["authHash"] == nil {
		t.Errorf("flags 0 batch = %v", going)
	}
	hash, _ := going[1]["authHash"].(string)
	if e := wialonErrURL(t, srv.URL, "core/use_auth_hash", `{"authHash":"`+hash+`"}`, ""); e != 0 {
		t.Errorf("the auth hash does not log in: error %d", e)
	}
}

// The messages a user's sessions hold are bounded; a load past it is 1004.
func TestWialonLoadedMessagesLimit(t *testing.T) {
	clk := newClock()
	_, srv := start(t, Config{Demo: true, Now: clk.Now, WialonLoadedMessagesLimit: 100})
	sid := login(t, srv, DemoWialonToken)
	to := int(clk.Now().Unix())
	load := func(hours int) int {
		return wialonErr(wialon(t, srv, "messages/load_interval",
			`{"itemId":10001,"timeFrom":`+itoa(to-hours*3600)+`,"timeTo":`+itoa(to)+`,"flags":1,"flagsMask":65281,"loadCount":1}`, sid))
	}
	if e := load(1); e != 0 {
		t.Fatalf("61 messages: error %d", e)
	}
	if e := load(1); e != 0 {
		t.Errorf("a load replacing the layer: error %d", e)
	}
	if e := load(2); e != 1004 {
		t.Errorf("121 messages: error %d, want 1004", e)
	}
}
