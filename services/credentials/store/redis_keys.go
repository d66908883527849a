package store

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/keyspace"
)

// Key layout. Every key of one tenant carries the tenant id as its Redis
// Cluster hash tag, so the tenant's record, index and session-set keys share
// a slot and one Lua script may touch them all atomically:
//
//	<prefix>:{<tenant>}:cred:<id>           HASH  the credential record
//	<prefix>:{<tenant>}:creds               ZSET  ids, all scores 0 (lexical paging)
//	<prefix>:{<tenant>}:cred:<id>:sessions  ZSET  session-hash hex, scored by expiry (Unix ms)
//	<prefix>:{<tenant>}:req:<op>:<req id>   HASH  first result of a request (PX RequestWindow)
//	<prefix>:sess:<sha256 hex>              STRING session record (JSON), PX until expiry
//
// Session keys have no hash tag: handles spread over the cluster and a
// session is found from its hash alone. Tenant and credential ids may not
// contain ':', '{' or '}', which keeps the layout unambiguous.
const (
	defaultPrefix = keyspace.DefaultPrefix
	maxPageSize   = 1000
	scanBatch     = 256
)

// requestKey is where the first result of request id of op is kept. An
// empty id gets a random one with a short window: the record then only
// serves the Redis client's retry of this very call.
func (r *Redis) requestKey(tenantID, op, id string) (string, time.Duration, error) {
	window := RequestWindow
	if id == "" {
		gen, err := NewGeneration()
		if err != nil {
			return "", 0, err
		}
		id, window = "auto-"+gen, autoRequestWindow
	} else if err := checkID("request", id); err != nil {
		return "", 0, err
	}
	return r.tenantTag(tenantID) + ":req:" + op + ":" + id, window, nil
}

// isRecordKey tells a record key from the session-set keys the SCAN
// pattern also matches: after "}:cred:" a record key has a bare id.
func (r *Redis) isRecordKey(key string) bool {
	rest, ok := strings.CutPrefix(key, r.prefix+":{")
	if !ok {
		return false
	}
	_, id, ok := strings.Cut(rest, "}:cred:")
	return ok && id != "" && !strings.Contains(id, ":")
}

func (r *Redis) tenantTag(tenantID string) string {
	return r.prefix + ":{" + tenantID + "}"
}

func (r *Redis) credKey(tenantID, credentialID string) string {
	return r.tenantTag(tenantID) + ":cred:" + credentialID
}

func (r *Redis) indexKey(tenantID string) string {
	return r.tenantTag(tenantID) + ":creds"
}

func (r *Redis) sessionSetKey(tenantID, credentialID string) string {
	return r.credKey(tenantID, credentialID) + ":sessions"
}

func (r *Redis) sessionKey(handleHash [32]byte) string {
	return r.prefix + ":sess:" + hex.EncodeToString(handleHash[:])
}

// checkIDs rejects ids that would make keys ambiguous or split a tenant's
// keys over hash slots.
func checkIDs(tenantID, credentialID string) error {
	if err := checkID("tenant", tenantID); err != nil {
		return err
	}
	return checkID("credential", credentialID)
}

func checkID(kind, id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty %s id", ErrInvalidArgument, kind)
	}
	if strings.ContainsAny(id, ":{}") {
		return fmt.Errorf("%w: %s id %q contains ':', '{' or '}'", ErrInvalidArgument, kind, id)
	}
	return nil
}

func decodePageToken(token string) (string, error) {
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || checkID("credential", string(raw)) != nil {
		return "", fmt.Errorf("%w: malformed page token", ErrInvalidArgument)
	}
	return string(raw), nil
}

// globEscape quotes SCAN MATCH metacharacters in a literal.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}
