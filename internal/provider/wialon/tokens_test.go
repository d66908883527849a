package wialon_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

// otherToken is another token of the same user, as token/list returns it.
const otherToken = "OTHERtok3nOTHERtok3nOTHERtok3nOTHERtok3nOTHERtok3nOTHERtok3nOTHERtok3nOT"

// TestTokenInfo: token/list's entry of the token held is found and read
// (and only its metadata comes back); the other tokens it lists, the token
// itself and the session never appear in an error.
func TestTokenInfo(t *testing.T) {
	list := `[{"h":"` + otherToken + `","app":"x","at":1700000000,"ct":1700000000,"dur":0,"fl":-1,"items":[],"p":"{}"},` +
		`{"h":"` + canary + `","app":"fleetbroker","at":1800000000,"ct":1799999990,"dur":86400,"fl":256,"ll":1800000500,"items":[],"p":"{}"}]`
	for _, tc := range []struct {
		name      string
		reply     string
		token     string
		wantFound bool
		wantInfo  wialon.TokenInfo
		wantErr   bool
		wantKind  upstream.Kind
	}{
		{name: "listed", reply: list, token: canary, wantFound: true, wantInfo: wialon.TokenInfo{
			ActivationTime: time.Unix(1800000000, 0).UTC(), Duration: 24 * time.Hour, AccessFlags: 256, LastUse: time.Unix(1800000500, 0).UTC()}},
		{name: "not listed", reply: `[{"h":"` + otherToken + `","at":1,"dur":0,"fl":-1}]`, token: canary},
		{name: "empty list", reply: `[]`, token: canary},
		{name: "access denied", reply: `{"error":7,"reason":"ACCESS_DENIED ` + canary + `"}`, token: canary, wantErr: true, wantKind: upstream.KindAccessDenied},
		{name: "malformed", reply: `{"h":"` + otherToken + `"}`, token: canary, wantErr: true, wantKind: upstream.KindInternal},
		{name: "wrong types", reply: `[{"h":"` + canary + `","at":"` + otherToken + `"}]`, token: canary, wantErr: true, wantKind: upstream.KindInternal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if err := r.ParseForm(); err != nil || r.Form.Get("svc") != "token/list" || r.Form.Get("sid") != "sid-canary" {
					t.Errorf("request %v", r.Form)
				}
				_, _ = w.Write([]byte(tc.reply))
			}))
			defer srv.Close()
			info, found, err := fastClient().TokenInfo(context.Background(), srv.URL, "sid-canary", tc.token)
			if tc.wantErr {
				if k := kindOf(t, err); k != tc.wantKind {
					t.Fatalf("error %v: kind %v, want %v", err, k, tc.wantKind)
				}
				for _, secret := range []string{canary, otherToken, "sid-canary"} {
					if strings.Contains(err.Error(), secret) {
						t.Errorf("error %q holds a secret", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if found != tc.wantFound || info != tc.wantInfo {
				t.Fatalf("TokenInfo = %+v, %v; want %+v, %v", info, found, tc.wantInfo, tc.wantFound)
			}
			if found && !info.ExpireTime().Equal(time.Unix(1800086400, 0)) {
				t.Errorf("ExpireTime = %v", info.ExpireTime())
			}
		})
	}
}

// TestTokenInfoFromSimulator: a token with unlimited rights lists itself
// (unlimited: no expiry).
func TestTokenInfoFromSimulator(t *testing.T) {
	_, srv := startSim(t, simulator.Config{Units: 1})
	c := fastClient()
	ctx := context.Background()
	sess, err := c.Login(ctx, srv.URL, simulator.DemoWialonToken)
	if err != nil {
		t.Fatal(err)
	}
	info, found, err := c.TokenInfo(ctx, srv.URL, sess.SID, simulator.DemoWialonToken)
	if err != nil || !found {
		t.Fatalf("TokenInfo = %+v, %v, %v", info, found, err)
	}
	if info.AccessFlags != -1 || !info.ExpireTime().IsZero() {
		t.Errorf("TokenInfo = %+v, want unlimited rights and no expiry", info)
	}
}
