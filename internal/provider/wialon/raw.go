package wialon

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/fleetbroker/fleetbroker/internal/upstream"
)

// The raw pass-through (CallProvider) runs only services on an allow-list
// of read-only services, never a deny-list: Wialon's API is large, and
// services that mint credentials or sessions (token/list, which lists the
// token strings themselves; token/update; core/duplicate;
// core/create_auth_hash; core/login …) must never run with the broker's
// shared session, whatever wraps them. core/batch is allowed only when
// every call inside it is, and is sent on as rebuilt from what was
// checked. Every reply has the session id cut out.

// DefaultRawServices are the services the raw pass-through allows unless
// the operator names others (--wialon-raw-services): searches and reads of
// items, account data and geofences, each documented as returning data
// only (help.wialon.com/en/api/user-guide/api-reference/<svc>). Nothing
// that loads messages into the shared session (messages/*), runs reports,
// edits items, sends commands, or touches sessions and tokens.
var DefaultRawServices = []string{
	"account/get_account_data",
	"core/check_items_billing",
	"core/get_account_data",
	"core/search_item",
	"core/search_items",
	"resource/get_zone_data",
	"resource/get_zones_by_unit",
}

// neverRaw are services no allow-list may open: they log in, hand out or
// end sessions, or read or make tokens. An operator listing one is refused
// at start (see CheckRawServices).
var neverRaw = []string{"token/", "core/login", "core/logout", "core/use_auth_hash", "core/create_auth_hash", "core/duplicate", "core/batch"}

const batchSvc = "core/batch"

// CheckRawServices validates an operator's allow-list.
func CheckRawServices(services []string) error {
	for _, s := range services {
		if !svcPattern.MatchString(s) {
			return fmt.Errorf("wialon raw service %q: not a service name (group/name)", s)
		}
		for _, d := range neverRaw {
			if strings.HasPrefix(s, d) {
				return fmt.Errorf("wialon raw service %q: logs in, hands out sessions or tokens, or wraps other calls (core/batch is allowed when every call in it is)", s)
			}
		}
	}
	return nil
}

// rawPolicy decides which raw calls may run.
type rawPolicy struct {
	allowed []string
}

// rawCall is a checked raw call: the service and the params to send, which
// for core/batch are rebuilt from the checked calls.
type rawCall struct {
	svc    string
	params json.RawMessage
	// services are the services that will run (the calls of a batch).
	services []string
}

// check refuses any service not on the allow-list, inside core/batch too,
// and returns the call to send.
func (p rawPolicy) check(svc string, params json.RawMessage) (rawCall, error) {
	if !svcPattern.MatchString(svc) {
		return rawCall{}, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: "raw", Reason: "svc must look like group/name"}
	}
	if len(params) == 0 {
		params = json.RawMessage("{}")
	}
	if !json.Valid(params) {
		return rawCall{}, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: "params is not valid JSON"}
	}
	if svc != batchSvc {
		if err := p.allow(svc); err != nil {
			return rawCall{}, err
		}
		return rawCall{svc: svc, params: params, services: []string{svc}}, nil
	}
	calls, flags, err := parseBatch(params)
	if err != nil {
		return rawCall{}, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: err.Error()}
	}
	services := make([]string, 0, len(calls))
	for _, c := range calls {
		if c.Svc == batchSvc {
			return rawCall{}, refused(c.Svc, "a batch inside a batch is not allowed")
		}
		if err := p.allow(c.Svc); err != nil {
			return rawCall{}, err
		}
		services = append(services, c.Svc)
	}
	rebuilt, err := json.Marshal(struct {
		Params []batchCall `json:"params"`
		Flags  int64       `json:"flags"`
	}{calls, flags})
	if err != nil {
		return rawCall{}, &upstream.Error{Kind: upstream.KindInvalidInput, Provider: providerName, Op: svc, Reason: "batch not representable as JSON"}
	}
	return rawCall{svc: svc, params: rebuilt, services: services}, nil
}

func (p rawPolicy) allow(svc string) error {
	if !slices.Contains(p.allowed, svc) {
		return refused(svc, "not on the raw pass-through's allow-list of read-only services (--wialon-raw-services)")
	}
	return nil
}

func refused(svc, why string) *upstream.Error {
	return &upstream.Error{Kind: upstream.KindAccessDenied, Provider: providerName, Op: svc, Reason: why}
}

// batchCall is one call of a core/batch.
type batchCall struct {
	Svc    string          `json:"svc"`
	Params json.RawMessage `json:"params"`
}

// maxBatch bounds the calls of one batch, so one raw call cannot hold the
// shared session for long.
const maxBatch = 50

// parseBatch reads core/batch params in both of Wialon's forms — the list
// itself, or {"params": [...], "flags": n} — strictly: each call must have
// exactly a service name and object params, so that what is checked is
// what Wialon runs.
func parseBatch(params json.RawMessage) ([]batchCall, int64, error) {
	var (
		list  json.RawMessage
		flags int64
	)
	if t := bytes.TrimSpace(params); len(t) > 0 && t[0] == '[' {
		list = t
	} else {
		var p map[string]json.RawMessage
		if err := json.Unmarshal(params, &p); err != nil {
			return nil, 0, fmt.Errorf("batch params: not an object or a list")
		}
		for k := range p {
			if k != "params" && k != "flags" {
				return nil, 0, fmt.Errorf("batch params: unexpected field %q", k)
			}
		}
		if f, ok := p["flags"]; ok {
			if err := json.Unmarshal(f, &flags); err != nil || flags < 0 || flags > 1 {
				return nil, 0, fmt.Errorf("batch flags: must be 0 or 1")
			}
		}
		list = p["params"]
	}
	var raw []map[string]json.RawMessage
	if err := json.Unmarshal(list, &raw); err != nil || len(raw) == 0 {
		return nil, 0, fmt.Errorf("batch params: need a list of {svc, params}")
	}
	if len(raw) > maxBatch {
		return nil, 0, fmt.Errorf("batch: at most %d calls", maxBatch)
	}
	calls := make([]batchCall, 0, len(raw))
	for i, item := range raw {
		var c batchCall
		for k, v := range item {
			switch k {
			case "svc":
				if err := json.Unmarshal(v, &c.Svc); err != nil {
					return nil, 0, fmt.Errorf("batch call %d: svc is not a string", i)
				}
			case "params":
				c.Params = v
			default:
				return nil, 0, fmt.Errorf("batch call %d: unexpected field %q", i, k)
			}
		}
		if !svcPattern.MatchString(c.Svc) {
			return nil, 0, fmt.Errorf("batch call %d: svc must look like group/name", i)
		}
		if len(c.Params) == 0 || bytes.Equal(bytes.TrimSpace(c.Params), []byte("null")) {
			c.Params = json.RawMessage("{}")
		}
		if t := bytes.TrimSpace(c.Params); t[0] != '{' {
			return nil, 0, fmt.Errorf("batch call %d: params must be an object", i)
		}
		calls = append(calls, c)
	}
	return calls, flags, nil
}

// scrubSID cuts the session id out of a reply: whatever service echoes it,
// a caller of the raw pass-through never learns the shared session.
func scrubSID(reply []byte, sid string) []byte {
	if len(sid) < 8 {
		return reply
	}
	return bytes.ReplaceAll(reply, []byte(sid), []byte("[redacted]"))
}
