package store

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// CreateSession implements Store.
//
// On a single Redis (and Sentinel's master) one script does it all, in one
// round trip: it checks the credential, registers the session with it and
// writes the session key, atomically. On a Cluster the session key lives
// in another slot than its credential, so the script registers the
// session (tenant slot) and the key is written after it (another slot), in
// a second round trip: a failure in between leaves only a set member
// without a key, which is harmless. A DeleteCredential running in between
// can miss the new key; the service's check that the credential still
// exists, and predates the session, covers that window.
//
// A replayed request writes the first session's key again if it is still
// listed with its credential (the first run may have stopped before
// writing it), never over an existing key; a revoked or deleted session is
// not listed and stays gone.
func (r *Redis) CreateSession(ctx context.Context, s Session, req Request) (SessionResult, error) {
	if err := checkIDs(s.TenantID, s.CredentialID); err != nil {
		return SessionResult{}, err
	}
	rec, err := json.Marshal(newSessionRecord(s))
	if err != nil {
		return SessionResult{}, fmt.Errorf("store: encode session: %w", err)
	}
	now := time.Now()
	member := hex.EncodeToString(s.HandleHash[:])
	key := r.sessionKey(s.HandleHash)
	ttl := ceilMillis(s.ExpireTime.Sub(now))
	keys := []string{r.credKey(s.TenantID, s.CredentialID), r.sessionSetKey(s.TenantID, s.CredentialID)}
	args := []any{member, s.ExpireTime.UnixMilli(), now.UnixMilli(), req.Hash, 0, string(rec), req.Memo, "0", "0", ttl.Milliseconds()}
	if req.ID != "" {
		reqKey, window, err := r.requestKey(s.TenantID, "issue", req.ID)
		if err != nil {
			return SessionResult{}, err
		}
		keys = append(keys, reqKey)
		args[4], args[7] = window.Milliseconds(), "1"
	}
	oneTrip := r.oneNode
	if oneTrip {
		keys = append(keys, key)
		args[8] = "1"
	}
	reply, err := issueScript.Run(ctx, r.client, keys, args...).Slice()
	if err != nil {
		return SessionResult{}, mapErr(err)
	}
	status, rest, err := splitReply(reply)
	if err != nil {
		return SessionResult{}, err
	}
	res := SessionResult{Session: s, Memo: req.Memo}
	switch status {
	case statusNotFound:
		return SessionResult{}, ErrNotFound
	case statusRejected:
		return SessionResult{}, ErrRejected
	case statusOK:
		if oneTrip {
			return res, nil
		}
	case statusReplay:
		first, err := pairsToMap(rest)
		if err != nil {
			return SessionResult{}, err
		}
		res.Replayed, res.RequestHash, res.Memo = true, first[rRequest], first[rMemo]
		if rec = []byte(first[rSession]); !json.Valid(rec) {
			return SessionResult{}, errors.New("store: corrupt request record of a session")
		}
		if res.Session, err = decodeSession(rec); err != nil {
			return SessionResult{}, err
		}
		if first[rLive] != "1" {
			return res, nil
		}
		key, ttl = r.sessionKey(res.Session.HandleHash), ceilMillis(res.Session.ExpireTime.Sub(now))
	default:
		return SessionResult{}, fmt.Errorf("store: unexpected script status %d", status)
	}
	if res.Replayed {
		err = r.client.SetNX(ctx, key, rec, ttl).Err()
	} else {
		err = r.client.Set(ctx, key, rec, ttl).Err()
	}
	if err != nil {
		return SessionResult{}, mapErr(err)
	}
	return res, nil
}

// ceilMillis rounds a TTL up to whole milliseconds (the key may outlive the
// session by under a millisecond; reads check ExpireTime) and to at least
// one, so an already expired session gets a key that expires at once
// rather than none.
func ceilMillis(d time.Duration) time.Duration {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	return max(ms, 1) * time.Millisecond
}

// GetSession implements Store.
func (r *Redis) GetSession(ctx context.Context, handleHash [32]byte) (Session, error) {
	raw, err := r.client.Get(ctx, r.sessionKey(handleHash)).Bytes()
	if err != nil {
		return Session{}, mapErr(err)
	}
	return r.liveSession(raw)
}

// GetSessionCredential implements Store: in one round trip on a single
// Redis (resolveScript), in two on a Cluster.
func (r *Redis) GetSessionCredential(ctx context.Context, handleHash [32]byte) (Session, *Credential, error) {
	if !r.oneNode {
		s, err := r.GetSession(ctx, handleHash)
		if err != nil {
			return Session{}, nil, err
		}
		return r.sessionCredential(ctx, s)
	}
	reply, err := resolveScript.Run(ctx, r.client, []string{r.sessionKey(handleHash)}, r.prefix).Slice()
	if err != nil {
		return Session{}, nil, mapErr(err)
	}
	if len(reply) == 0 {
		return Session{}, nil, ErrNotFound
	}
	followed, parts, err := splitReply(reply[1:])
	if err != nil {
		return Session{}, nil, err
	}
	raw, ok := reply[0].(string)
	if !ok {
		return Session{}, nil, fmt.Errorf("store: script reply element is %T, not a string", reply[0])
	}
	s, err := r.liveSession([]byte(raw))
	if err != nil {
		return Session{}, nil, err
	}
	if followed != 1 {
		// The script could not follow the record (it does not decode as
		// the script expects, or names ids the store refuses).
		return r.sessionCredential(ctx, s)
	}
	if len(parts) == 0 {
		return s, nil, nil
	}
	fields, err := pairsToMap(parts)
	if err != nil {
		return Session{}, nil, err
	}
	c, err := parseCredential(fields)
	if err != nil {
		return Session{}, nil, err
	}
	return s, &c, nil
}

// sessionCredential reads the credential a live session names: nil if it
// is gone.
func (r *Redis) sessionCredential(ctx context.Context, s Session) (Session, *Credential, error) {
	c, err := r.GetCredential(ctx, s.TenantID, s.CredentialID)
	if errors.Is(err, ErrNotFound) {
		return s, nil, nil
	}
	if err != nil {
		return Session{}, nil, err
	}
	return s, &c, nil
}

// DeleteSession implements Store. The session leaves its credential's set
// first, then its key goes (waiting for replicas, so a failover does not
// bring a revoked handle back); if the second step fails the call fails and
// the handle still works until the caller retries. Leaving the set first
// means a replayed IssueSession never writes a revoked session again.
func (r *Redis) DeleteSession(ctx context.Context, handleHash [32]byte) (Session, error) {
	key := r.sessionKey(handleHash)
	raw, err := r.client.Get(ctx, key).Bytes()
	if err != nil {
		return Session{}, mapErr(err)
	}
	s, err := r.liveSession(raw)
	if err != nil {
		return Session{}, err
	}
	member := hex.EncodeToString(handleHash[:])
	if err := r.client.ZRem(ctx, r.sessionSetKey(s.TenantID, s.CredentialID), member).Err(); err != nil {
		return Session{}, mapErr(err)
	}
	err = r.durable(ctx, key, func(c redis.Cmdable) error {
		raw, err = c.GetDel(ctx, key).Bytes()
		return mapErr(err)
	})
	if err != nil {
		return Session{}, err // ErrNotFound if revoked concurrently
	}
	return r.liveSession(raw)
}

// liveSession decodes a session record; one past its ExpireTime is not
// found, even if its key has not expired yet.
func (r *Redis) liveSession(raw []byte) (Session, error) {
	s, err := decodeSession(raw)
	if err != nil {
		return Session{}, err
	}
	if !time.Now().Before(s.ExpireTime) {
		return Session{}, ErrNotFound
	}
	return s, nil
}
