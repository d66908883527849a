package store

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// PutCredential implements Store. A zero CreateTime or UpdateTime is set
// to the current time; an empty Generation gets a fresh random one.
func (r *Redis) PutCredential(ctx context.Context, c Credential, opts PutOptions) (PutResult, error) {
	keys, args, err := r.putCall(c, opts)
	if err != nil {
		return PutResult{}, err
	}
	var reply []any
	err = r.durable(ctx, keys[0], func(cl redis.Cmdable) error {
		var err error
		reply, err = putScript.Run(ctx, cl, keys, args...).Slice()
		return mapErr(err)
	})
	if err != nil {
		return PutResult{}, err
	}
	return putResult(reply, args)
}

// putCall is putScript's keys and arguments for putting c.
func (r *Redis) putCall(c Credential, opts PutOptions) ([]string, []any, error) {
	if err := checkIDs(c.TenantID, c.CredentialID); err != nil {
		return nil, nil, err
	}
	reqKey, window, err := r.requestKey(c.TenantID, "put", opts.Request.ID)
	if err != nil {
		return nil, nil, err
	}
	if c.Generation == "" {
		gen, err := NewGeneration()
		if err != nil {
			return nil, nil, err
		}
		c.Generation = gen
	}
	now := time.Now()
	if c.CreateTime.IsZero() {
		c.CreateTime = now
	}
	if c.UpdateTime.IsZero() {
		c.UpdateTime = now
	}
	labels, err := encodeLabels(c.Labels)
	if err != nil {
		return nil, nil, err
	}
	expected := ""
	if opts.ExpectedVersion != nil {
		expected = strconv.FormatInt(*opts.ExpectedVersion, 10)
	}
	args := []any{
		c.CredentialID, formatTime(c.CreateTime),
		opts.Request.Hash, window.Milliseconds(), expected,
		fTenant, c.TenantID,
		fID, c.CredentialID,
		fProvider, c.Provider,
		fGeneration, c.Generation,
		fCiphertext, c.Ciphertext,
		fADVersion, strconv.Itoa(max(c.ADVersion, 1)),
		fFingerprint, c.Fingerprint,
		fBaseURL, c.BaseURL,
		fFleetUpAccountID, strconv.FormatInt(c.FleetUpAccountID, 10),
		fLabels, labels,
		fUpdateTime, formatTime(c.UpdateTime),
		fTokenExpireTime, formatTime(c.TokenExpireTime),
		fLastUsedTime, formatTime(c.LastUsedTime),
	}
	args = append(args, validationFields(Validation{
		State: c.ValidationState, Message: c.ValidationMessage,
		UpstreamUser: c.UpstreamUser, Time: c.ValidateTime,
	})...)
	return []string{r.credKey(c.TenantID, c.CredentialID), r.indexKey(c.TenantID), reqKey}, args, nil
}

// putResult reads putScript's reply to a call with args: on a write, the
// stored record is the fields args set, with the version and create time
// the script chose.
func putResult(reply []any, args []any) (PutResult, error) {
	status, rest, err := splitReply(reply)
	if err != nil {
		return PutResult{}, err
	}
	var fields map[string]string
	switch status {
	case statusConflict:
		return PutResult{}, ErrVersionConflict
	case statusScriptError:
		return PutResult{}, fmt.Errorf("store: redis: %s", strings.Join(rest, " "))
	case statusReplay:
		if fields, err = pairsToMap(rest); err != nil {
			return PutResult{}, err
		}
	case statusOK, statusNotFound: // created, replaced
		if len(rest) != 2 {
			return PutResult{}, fmt.Errorf("store: put reply has %d values, want 2", len(rest))
		}
		fields = make(map[string]string, len(args)/2+2)
		for i := putFieldsFrom; i+1 < len(args); i += 2 {
			fields[args[i].(string)] = fmt.Sprint(args[i+1])
		}
		fields[fVersion], fields[fCreateTime] = rest[0], rest[1]
	default:
		return PutResult{}, fmt.Errorf("store: unexpected script status %d", status)
	}
	res := PutResult{Created: status == statusOK}
	if status == statusReplay {
		res.Replayed, res.RequestHash, res.Created = true, fields[rRequest], fields[rCreated] == "1"
	}
	res.Credential, err = parseCredential(fields)
	return res, err
}

// putFieldsFrom is where putScript's field/value pairs start in its
// arguments (ARGV[6], 0-based 5).
const putFieldsFrom = 5

// GetCredential implements Store.
func (r *Redis) GetCredential(ctx context.Context, tenantID, credentialID string) (Credential, error) {
	if err := checkIDs(tenantID, credentialID); err != nil {
		return Credential{}, err
	}
	fields, err := r.client.HGetAll(ctx, r.credKey(tenantID, credentialID)).Result()
	if err != nil {
		return Credential{}, mapErr(err)
	}
	if len(fields) == 0 {
		return Credential{}, ErrNotFound
	}
	return parseCredential(fields)
}

// ListCredentials implements Store. Page sizes above 1000 are served 1000
// at a time. The token is the last id returned, so a page stays correct
// when credentials are added or deleted between calls.
func (r *Redis) ListCredentials(ctx context.Context, tenantID string, pageSize int, pageToken string) ([]Credential, string, error) {
	if err := checkID("tenant", tenantID); err != nil {
		return nil, "", err
	}
	if pageSize <= 0 {
		return nil, "", fmt.Errorf("%w: page size %d is not positive", ErrInvalidArgument, pageSize)
	}
	pageSize = min(pageSize, maxPageSize)
	start := "-"
	if pageToken != "" {
		after, err := decodePageToken(pageToken)
		if err != nil {
			return nil, "", err
		}
		start = "(" + after
	}
	// One extra id tells whether another page follows, so the last page
	// carries an empty token rather than leading to an empty page.
	ids, err := r.client.ZRangeByLex(ctx, r.indexKey(tenantID), &redis.ZRangeBy{
		Min: start, Max: "+", Count: int64(pageSize) + 1,
	}).Result()
	if err != nil {
		return nil, "", mapErr(err)
	}
	next := ""
	if len(ids) > pageSize {
		ids = ids[:pageSize]
		next = base64.RawURLEncoding.EncodeToString([]byte(ids[len(ids)-1]))
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = r.credKey(tenantID, id)
	}
	// A record deleted since the index was read is left out of the page.
	creds, err := loadRecords(ctx, r.client, keys)
	return creds, next, err
}

// DeleteCredential implements Store.
//
// The record and the session set go first, atomically in the tenant's slot;
// the session keys, in other slots, go after. A failure between the steps
// leaves session keys whose credential is gone: the service rejects every
// session whose credential is missing or was re-created after the session's
// CreateTime, so such leftovers grant nothing and expire by their TTL.
func (r *Redis) DeleteCredential(ctx context.Context, tenantID, credentialID string, req Request) (DeleteResult, error) {
	if err := checkIDs(tenantID, credentialID); err != nil {
		return DeleteResult{}, err
	}
	reqKey, window, err := r.requestKey(tenantID, "delete", req.ID)
	if err != nil {
		return DeleteResult{}, err
	}
	keys := []string{r.credKey(tenantID, credentialID), r.indexKey(tenantID), r.sessionSetKey(tenantID, credentialID), reqKey}
	var reply []any
	err = r.durable(ctx, keys[0], func(c redis.Cmdable) error {
		var err error
		reply, err = deleteScript.Run(ctx, c, keys, credentialID, req.Hash, window.Milliseconds()).Slice()
		return mapErr(err)
	})
	if err != nil {
		return DeleteResult{}, err
	}
	status, rest, err := splitReply(reply)
	if err != nil {
		return DeleteResult{}, err
	}
	var res DeleteResult
	var members []string
	switch status {
	case statusNotFound:
		return DeleteResult{}, ErrNotFound
	case statusOK:
		members = rest
	case statusReplay:
		first, err := pairsToMap(rest)
		if err != nil {
			return DeleteResult{}, err
		}
		res.Replayed, res.RequestHash = true, first[rRequest]
		if n, err := strconv.ParseInt(first[rRevoked], 10, 64); err == nil {
			res.Revoked = n
			return res, nil
		}
		// The first run stopped before counting: finish its work.
		if first[rSessions] != "" {
			members = strings.Split(first[rSessions], ",")
		}
	default:
		return DeleteResult{}, fmt.Errorf("store: unexpected script status %d", status)
	}
	res.Revoked, err = r.deleteSessionKeys(ctx, members)
	if err != nil {
		return DeleteResult{}, err
	}
	if err := setIfExistsScript.Run(ctx, r.client, []string{reqKey}, rRevoked, res.Revoked).Err(); err != nil {
		return DeleteResult{}, mapErr(err)
	}
	return res, nil
}

// deleteSessionKeys deletes the session keys of members (session hashes in
// hex) and returns how many existed, i.e. were live.
func (r *Redis) deleteSessionKeys(ctx context.Context, members []string) (int64, error) {
	// One DEL per key: in a Cluster the keys live in different slots.
	pipe := r.client.Pipeline()
	cmds := make([]*redis.IntCmd, 0, len(members))
	for _, m := range members {
		h, err := hex.DecodeString(m)
		if err != nil || len(h) != 32 {
			continue
		}
		cmds = append(cmds, pipe.Del(ctx, r.prefix+":sess:"+m))
	}
	if len(cmds) == 0 {
		return 0, nil
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return 0, mapErr(err)
	}
	var n int64
	for _, c := range cmds {
		n += c.Val()
	}
	return n, nil
}

// SetValidation implements Store.
func (r *Redis) SetValidation(ctx context.Context, tenantID, credentialID string, version int64, v Validation) (Credential, error) {
	fields, err := r.casFields(ctx, tenantID, credentialID, version, validationFields(v)...)
	if err != nil {
		return Credential{}, err
	}
	return parseCredential(fields)
}

// RecordUse implements Store.
func (r *Redis) RecordUse(ctx context.Context, tenantID, credentialID string, version int64, t time.Time) error {
	_, err := r.casFields(ctx, tenantID, credentialID, version, fLastUsedTime, formatTime(t))
	return err
}

// UpdateCiphertext implements Store.
func (r *Redis) UpdateCiphertext(ctx context.Context, tenantID, credentialID string, version int64, ciphertext string, adVersion int) error {
	_, err := r.casFields(ctx, tenantID, credentialID, version, fCiphertext, ciphertext, fADVersion, strconv.Itoa(max(adVersion, 1)))
	return err
}

// casFields runs casFieldsScript and returns the updated record's fields.
// Running it twice sets the same values twice: idempotent by itself.
func (r *Redis) casFields(ctx context.Context, tenantID, credentialID string, version int64, pairs ...any) (map[string]string, error) {
	if err := checkIDs(tenantID, credentialID); err != nil {
		return nil, err
	}
	args := append([]any{strconv.FormatInt(version, 10)}, pairs...)
	key := r.credKey(tenantID, credentialID)
	var reply []any
	err := r.durable(ctx, key, func(c redis.Cmdable) error {
		var err error
		reply, err = casFieldsScript.Run(ctx, c, []string{key}, args...).Slice()
		return mapErr(err)
	})
	if err != nil {
		return nil, err
	}
	status, fields, err := splitReply(reply)
	if err != nil {
		return nil, err
	}
	switch status {
	case statusOK:
		return pairsToMap(fields)
	case statusNotFound:
		return nil, ErrNotFound
	case statusConflict:
		return nil, ErrVersionConflict
	default:
		return nil, fmt.Errorf("store: unexpected script status %d", status)
	}
}

// ForEachCredential implements Store. It scans every master (cluster) or
// shard (ring), one after the other, so fn is never called concurrently; an
// error from fn stops the walk and is returned as is. A record that moves
// between cluster nodes during the walk may be missed; rewrap is re-runnable.
func (r *Redis) ForEachCredential(ctx context.Context, fn func(Credential) error) error {
	nodes, err := r.scanNodes(ctx)
	if err != nil {
		return mapErr(err)
	}
	// SCAN may return a key more than once; fn sees each record once.
	seen := make(map[string]struct{})
	for _, node := range nodes {
		if err := r.scanNode(ctx, node, seen, fn); err != nil {
			return err
		}
	}
	return nil
}

// scanNodes lists the nodes that together hold every key.
func (r *Redis) scanNodes(ctx context.Context) ([]redis.Cmdable, error) {
	var (
		mu    sync.Mutex
		nodes []redis.Cmdable
	)
	collect := func(_ context.Context, c *redis.Client) error {
		mu.Lock()
		defer mu.Unlock()
		nodes = append(nodes, c)
		return nil
	}
	switch c := r.client.(type) {
	case *redis.ClusterClient:
		err := c.ForEachMaster(ctx, collect)
		return nodes, err
	case *redis.Ring:
		err := c.ForEachShard(ctx, collect)
		return nodes, err
	default:
		return []redis.Cmdable{r.client}, nil
	}
}

func (r *Redis) scanNode(ctx context.Context, node redis.Cmdable, seen map[string]struct{}, fn func(Credential) error) error {
	pattern := globEscape(r.prefix) + ":{*}:cred:*"
	var cursor uint64
	for {
		keys, next, err := node.Scan(ctx, cursor, pattern, scanBatch).Result()
		if err != nil {
			return mapErr(err)
		}
		var batch []string
		for _, k := range keys {
			if _, dup := seen[k]; dup || !r.isRecordKey(k) {
				continue
			}
			seen[k] = struct{}{}
			batch = append(batch, k)
		}
		creds, err := loadRecords(ctx, node, batch)
		if err != nil {
			return err
		}
		for _, c := range creds {
			if err := fn(c); err != nil {
				return err
			}
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}

// loadRecords reads record hashes in one pipeline, skipping missing ones.
func loadRecords(ctx context.Context, c redis.Cmdable, keys []string) ([]Credential, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	pipe := c.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, len(keys))
	for i, k := range keys {
		cmds[i] = pipe.HGetAll(ctx, k)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, mapErr(err)
	}
	creds := make([]Credential, 0, len(keys))
	for _, cmd := range cmds {
		if len(cmd.Val()) == 0 {
			continue
		}
		c, err := parseCredential(cmd.Val())
		if err != nil {
			return nil, err
		}
		creds = append(creds, c)
	}
	return creds, nil
}
