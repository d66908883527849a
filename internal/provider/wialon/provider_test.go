package wialon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/anypb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/provider/wialon"
)

// conn lends the provider a session in this process (no cross-replica
// leases: the provider then bounds concurrency itself).
func conn(t *testing.T, baseURL, sid string) *provider.Conn {
	t.Helper()
	packed, err := anypb.New(&credentialsv1.WialonUpstreamSession{Eid: sid})
	if err != nil {
		t.Fatal(err)
	}
	return &provider.Conn{Target: provider.Target{Tenant: "t", Credential: "c", Generation: "g", BaseURL: baseURL},
		Session: &credentialsv1.MintUpstreamSessionResponse{BaseUrl: baseURL, UpstreamSession: packed}}
}

// A Wialon whose count says only how many messages it returned still
// pages: a full page gets a token, and paging ends on a page that is not
// full.
func TestHistoryPagesWhenCountIsWhatWasReturned(t *testing.T) {
	const total = 5
	base := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		if r.PostForm.Get("svc") != "messages/load_interval" {
			fmt.Fprint(w, `{}`)
			return
		}
		var p struct {
			TimeFrom  int64 `json:"timeFrom"`
			LoadCount int   `json:"loadCount"`
		}
		_ = json.Unmarshal([]byte(r.PostForm.Get("params")), &p)
		var msgs []string
		for s := int64(1000); s < 1000+total*60; s += 60 {
			if s >= p.TimeFrom && len(msgs) < p.LoadCount {
				msgs = append(msgs, `{"t":`+strconv.FormatInt(s, 10)+`,"tp":"ud","pos":{"y":1,"x":2}}`)
			}
		}
		fmt.Fprintf(w, `{"count":%d,"messages":[%s]}`, len(msgs), strings.Join(msgs, ","))
	}))
	p := wialon.NewProvider(provider.Env{HTTPClient: func(string) *http.Client { return &http.Client{Timeout: 5 * time.Second} }}).(provider.HistoryPager)
	req := provider.HistoryPageRequest{UnitID: "1", From: time.Unix(1000, 0), To: time.Unix(2000, 0), PageSize: 2}
	var got []int64
	for pages := 1; ; pages++ {
		page, err := p.HistoryPage(context.Background(), conn(t, base, "sid"), req)
		if err != nil {
			t.Fatal(err)
		}
		for _, pos := range page.Positions {
			got = append(got, pos.GetTime().AsTime().Unix())
		}
		if page.NextPageToken == "" {
			break
		}
		if pages > 5 {
			t.Fatal("paging does not end")
		}
		req.PageToken = page.NextPageToken
	}
	if fmt.Sprint(got) != "[1000 1060 1120 1180 1240]" {
		t.Errorf("positions %v", got)
	}
}
