package wialon

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

func TestRawAllowList(t *testing.T) {
	p := rawPolicy{allowed: DefaultRawServices}
	many := make([]string, maxBatch+1)
	for i := range many {
		many[i] = `{"svc":"core/search_item","params":{"id":1}}`
	}
	tests := []struct {
		name, svc, params string
		want              upstream.Kind // KindInternal: allowed
		services          []string
	}{
		{"a listed read", "core/search_items", `{"spec":{}}`, upstream.KindInternal, []string{"core/search_items"}},
		{"a write", "item/update_name", `{}`, upstream.KindAccessDenied, nil},
		{"token/list", "token/list", `{}`, upstream.KindAccessDenied, nil},
		{"core/duplicate", "core/duplicate", `{}`, upstream.KindAccessDenied, nil},
		{"core/create_auth_hash", "core/create_auth_hash", `{}`, upstream.KindAccessDenied, nil},
		{"core/logout", "core/logout", `{}`, upstream.KindAccessDenied, nil},
		{"a batch of reads", "core/batch", `{"params":[{"svc":"core/search_item","params":{"id":1}},{"svc":"core/search_items","params":{}}],"flags":1}`,
			upstream.KindInternal, []string{"core/search_item", "core/search_items"}},
		{"a batch as a bare list", "core/batch", `[{"svc":"core/search_item","params":{"id":1}}]`, upstream.KindInternal, []string{"core/search_item"}},
		{"token/list in a batch", "core/batch", `{"params":[{"svc":"core/search_item","params":{}},{"svc":"token/list","params":{}}]}`, upstream.KindAccessDenied, nil},
		{"core/duplicate in a bare batch", "core/batch", `[{"svc":"core/duplicate"}]`, upstream.KindAccessDenied, nil},
		{"a nested batch", "core/batch", `{"params":[{"svc":"core/batch","params":{"params":[{"svc":"token/list"}]}}]}`, upstream.KindAccessDenied, nil},
		{"a second svc key", "core/batch", `{"params":[{"svc":"core/search_item","params":{},"svc2":"token/list"}]}`, upstream.KindInvalidInput, nil},
		{"an unknown batch field", "core/batch", `{"params":[{"svc":"core/search_item"}],"sid":"x"}`, upstream.KindInvalidInput, nil},
		{"params that are not an object", "core/batch", `{"params":[{"svc":"core/search_item","params":[1]}]}`, upstream.KindInvalidInput, nil},
		{"svc that is not a string", "core/batch", `{"params":[{"svc":["token/list"]}]}`, upstream.KindInvalidInput, nil},
		{"flags out of range", "core/batch", `{"params":[{"svc":"core/search_item"}],"flags":7}`, upstream.KindInvalidInput, nil},
		{"an empty batch", "core/batch", `{"params":[]}`, upstream.KindInvalidInput, nil},
		{"too many calls", "core/batch", "[" + strings.Join(many, ",") + "]", upstream.KindInvalidInput, nil},
		{"not a service name", "../admin", `{}`, upstream.KindInvalidInput, nil},
		{"params not JSON", "core/search_items", `{x`, upstream.KindInvalidInput, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			call, err := p.check(tt.svc, json.RawMessage(tt.params))
			if tt.want == upstream.KindInternal {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if fmt.Sprint(call.services) != fmt.Sprint(tt.services) {
					t.Errorf("services %v, want %v", call.services, tt.services)
				}
				if tt.svc == batchSvc {
					// What is sent is rebuilt from what was checked.
					calls, _, err := parseBatch(call.params)
					if err != nil || len(calls) != len(tt.services) {
						t.Errorf("rebuilt batch %s: %v", call.params, err)
					}
				}
				return
			}
			if k := upstream.KindOf(err); k != tt.want {
				t.Errorf("got %v (%v), want %v", k, err, tt.want)
			}
		})
	}
}

func TestCheckRawServices(t *testing.T) {
	if err := CheckRawServices(DefaultRawServices); err != nil {
		t.Fatalf("the default list: %v", err)
	}
	for _, svc := range []string{"token/list", "token/update", "core/login", "core/logout", "core/use_auth_hash", "core/create_auth_hash", "core/duplicate", "core/batch", "core/*", "x"} {
		if err := CheckRawServices([]string{"core/search_items", svc}); err == nil {
			t.Errorf("%q accepted on the raw allow-list", svc)
		}
	}
}

func TestScrubSID(t *testing.T) {
	const sid = "0123456789abcdef0123456789abcdef"
	got := string(scrubSID([]byte(`{"sid":"`+sid+`","n":"x`+sid+`y"}`), sid))
	if strings.Contains(got, sid) || !json.Valid([]byte(got)) {
		t.Errorf("scrubbed reply %s", got)
	}
}

func TestPageTokens(t *testing.T) {
	from, to := time.Unix(1_700_000_000, 0), time.Unix(1_700_100_000, 0)
	at := func(sec int64) Message { return Message{Time: time.Unix(sec, 0).UTC()} }
	tests := []struct {
		name     string
		msgs     []Message
		cur      cursor
		wantFrom int64
		wantSkip int
	}{
		{"last second once", []Message{at(1_700_000_010), at(1_700_000_020)}, cursor{from: from}, 1_700_000_020, 1},
		{"last second twice", []Message{at(1_700_000_010), at(1_700_000_020), at(1_700_000_020)}, cursor{from: from}, 1_700_000_020, 2},
		{"a page of one second", []Message{at(1_700_000_020), at(1_700_000_020)}, cursor{from: time.Unix(1_700_000_020, 0), skip: 1}, 1_700_000_020, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			token := nextPageToken(tt.msgs, tt.cur, "10001", from, to)
			cur, err := parsePageToken(token, "10001", from, to)
			if err != nil {
				t.Fatal(err)
			}
			if cur.from.Unix() != tt.wantFrom || cur.skip != tt.wantSkip {
				t.Errorf("cursor %v/%d, want %d/%d", cur.from.Unix(), cur.skip, tt.wantFrom, tt.wantSkip)
			}
			for _, other := range []struct {
				unit     string
				from, to time.Time
			}{{"10002", from, to}, {"10001", from.Add(time.Second), to}, {"10001", from, to.Add(time.Second)}} {
				var fe *provider.FieldError
				if _, err := parsePageToken(token, other.unit, other.from, other.to); err == nil || !asField(err, &fe) || fe.Field != "page_token" {
					t.Errorf("a token used for %v: %v", other, err)
				}
			}
		})
	}
	for _, bad := range []string{"", "!!", "dzE6eDp5Onp6", "dzE6MTcwMDAwMDAxMDotMTphYg"} {
		if _, err := parsePageToken(bad, "10001", from, to); err == nil {
			t.Errorf("token %q accepted", bad)
		}
	}
}

func asField(err error, fe **provider.FieldError) bool {
	f, ok := err.(*provider.FieldError)
	*fe = f
	return ok
}
