package store

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
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
	defaultPrefix = "fb"
	maxPageSize   = 1000
	scanBatch     = 256
)

// Record hash fields.
const (
	fTenant            = "tenant"
	fID                = "id"
	fProvider          = "provider"
	fVersion           = "version"
	fGeneration        = "generation"
	fCiphertext        = "ciphertext"
	fADVersion         = "ad_version"
	fFingerprint       = "fingerprint"
	fBaseURL           = "base_url"
	fFleetUpAccountID  = "fleetup_account_id"
	fLabels            = "labels"
	fCreateTime        = "create_time"
	fUpdateTime        = "update_time"
	fValidateTime      = "validate_time"
	fValidationState   = "validation_state"
	fValidationMessage = "validation_message"
	fUpstreamUser      = "upstream_user"
	fTokenExpireTime   = "token_expire_time"
	fLastUsedTime      = "last_used_time"
)

// Script reply status, the first element of every script's reply.
const (
	statusOK       = 1
	statusNotFound = 0
	statusConflict = -1
	statusReplay   = 2
	statusRejected = 3
	// statusScriptError: putBatchScript failed on one item.
	statusScriptError = -2
)

// Fields of a request record beside the stored result.
const (
	rRequest  = "_request"  // the request hash of the first run
	rCreated  = "_created"  // put: 1 if the first run created the record
	rSessions = "_sessions" // delete: the session hashes it revoked, comma-separated
	rRevoked  = "_revoked"  // delete: how many of them were live
	rSession  = "_session"  // issue: the session record (JSON)
	rMemo     = "_memo"     // issue: the caller's memo
	rMember   = "_member"   // issue: the session hash the first run registered
	rLive     = "_live"     // issue, in a replay reply: 1 if the session is still listed
)

// autoRequestWindow keeps the request record of a write whose caller gave
// no request id: long enough for the client's own retry of that write.
const autoRequestWindow = time.Minute

// putLua is putScript's body as a function of its keys and arguments, so
// that putBatchScript runs the same code for each item.
//
// It creates or replaces a record in one step, so concurrent puts
// serialize in Redis and every put gets its own version. A request seen
// before returns its first result and changes nothing but a replay count,
// so a second run of the same put (a retry after a lost reply) does not add
// another version; counting is a write, so a WAIT after the replay also
// waits for the first run's write to reach the replicas.
//
// keys[1] record, keys[2] tenant index, keys[3] request record.
// argv[1] credential id, argv[2] create time for a new record,
// argv[3] request hash, argv[4] request window (ms), argv[5] expected
// version (” for any, '0' for none), argv[6..] the other field/value pairs.
// Reply: {created (0|1), version, create time} (the record is exactly
// those two and argv[6..]) | {2, HGETALL of the request record...} replay |
// {-1} version differs.
const putLua = `
local function put(keys, argv)
  local first = redis.call('HGETALL', keys[3])
  if #first > 0 then
    -- A write, so a WAIT after the replay also covers the first run's write.
    redis.call('HINCRBY', keys[3], '_replays', 1)
    return {2, unpack(first)}
  end
  local created = 0
  local version = 1
  local createTime = argv[2]
  local old = redis.call('HMGET', keys[1], 'version', 'create_time')
  if argv[5] ~= '' and tonumber(old[1] or '0') ~= tonumber(argv[5]) then return {-1} end
  if old[1] then
    version = tonumber(old[1]) + 1
    createTime = old[2] or createTime
    -- Start from an empty hash so no field of the old record survives.
    redis.call('DEL', keys[1])
  else
    created = 1
  end
  redis.call('HSET', keys[1], 'version', tostring(version), 'create_time', createTime, unpack(argv, 6))
  redis.call('ZADD', keys[2], 0, argv[1])
  -- The first result, for a repeat of this request: the record's metadata
  -- (its ciphertext is not needed to answer, and is not copied).
  local result = {'_request', argv[3], '_created', tostring(created), 'version', tostring(version), 'create_time', createTime}
  for i = 6, #argv, 2 do
    if argv[i] ~= 'ciphertext' then
      result[#result + 1] = argv[i]
      result[#result + 1] = argv[i + 1]
    end
  end
  redis.call('HSET', keys[3], unpack(result))
  redis.call('PEXPIRE', keys[3], argv[4])
  return {created, tostring(version), createTime}
end
`

// putScript puts one record (putLua).
var putScript = redis.NewScript(putLua + `return put(KEYS, ARGV)`)

// putBatchScript puts many records of one tenant (so one hash slot), each
// as putScript would, in one script call: the per-call cost of a script is
// paid once for all of them. Each item is applied by itself; one item's
// outcome does not change another's.
//
// KEYS: putScript's three keys for each item, in order. ARGV: for each
// item, the number of its arguments and then putScript's arguments.
// Reply: putScript's reply for each item, in order, or {-2, error} for an
// item the script failed on (what it wrote before failing stays written, as
// with putScript).
var putBatchScript = redis.NewScript(putLua + `
local out = {}
local k, a = 1, 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local argv = {}
  for i = 1, n do argv[i] = ARGV[a + i] end
  -- An item the script fails on (a key of another type) fails alone.
  local ok, res = pcall(put, {KEYS[k], KEYS[k + 1], KEYS[k + 2]}, argv)
  if not ok then res = {-2, tostring(res)} end
  out[#out + 1] = res
  k, a = k + 3, a + n + 1
end
return out
`)

// putBatchSize is the most items one putBatchScript call carries: a script
// blocks Redis while it runs, so a big batch goes as a few calls (in one
// pipeline).
const putBatchSize = 100

// casFieldsScript sets fields of a record only if it is still at the
// expected version (optimistic concurrency for validation and rewrap).
//
// KEYS[1] record. ARGV[1] expected version, ARGV[2..] field/value pairs.
// Reply: {1, HGETALL...} | {0} missing | {-1} version changed.
var casFieldsScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {0} end
if tonumber(v) ~= tonumber(ARGV[1]) then return {-1} end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return {1, unpack(redis.call('HGETALL', KEYS[1]))}
`)

// deleteScript removes a record, its index entry and its session set, and
// hands back the session hashes so the caller can delete the session keys,
// which live in other slots. A request seen before returns its first result
// and deletes nothing (a second run would otherwise find no credential);
// like putScript, it counts the replay, so a WAIT after it covers the first
// run's write.
//
// KEYS[1] record, KEYS[2] tenant index, KEYS[3] session set, KEYS[4]
// request record. ARGV[1] id, ARGV[2] request hash, ARGV[3] window (ms).
// Reply: {1, session hex...} | {0} missing | {2, HGETALL of the request
// record...} replay.
var deleteScript = redis.NewScript(`
local first = redis.call('HGETALL', KEYS[4])
if #first > 0 then
  redis.call('HINCRBY', KEYS[4], '_replays', 1)
  return {2, unpack(first)}
end
if redis.call('DEL', KEYS[1]) == 0 then return {0} end
redis.call('ZREM', KEYS[2], ARGV[1])
local members = redis.call('ZRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[4], '_request', ARGV[2], '_sessions', table.concat(members, ','))
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return {1, unpack(members)}
`)

// setIfExistsScript sets one field of a hash that still exists, so a
// request record that expired meanwhile is not brought back without a TTL.
//
// KEYS[1] hash. ARGV[1] field, ARGV[2] value. Reply: 1.
var setIfExistsScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
`)

// issueScript registers a session with its credential, if the credential
// exists and its provider has not rejected it, and prunes sessions that
// have expired. With a request id (ARGV[8] = '1') the first run also
// stores the session record and the caller's memo under the request; a
// later run returns them, and whether the first session is still listed
// (not revoked since), without registering anything. With the session key
// (ARGV[9] = '1': a single Redis, where one script may write keys of
// several slots) it also writes the session record there, so a new session
// takes one round trip.
//
// KEYS[1] record, KEYS[2] session set, then KEYS[3] request record if
// ARGV[8] = '1', then the session key if ARGV[9] = '1'.
// ARGV[1] session hex, ARGV[2] expiry (Unix ms), ARGV[3] now (Unix ms),
// ARGV[4] request hash, ARGV[5] window (ms), ARGV[6] session record (JSON),
// ARGV[7] memo, ARGV[8] request key given, ARGV[9] session key given,
// ARGV[10] session key TTL (ms).
// Reply: {1} | {0} credential missing | {3} credential rejected |
// {2, HGETALL of the request record..., '_live', 0|1} replay.
var issueScript = redis.NewScript(`
local cred = redis.call('HMGET', KEYS[1], 'version', 'validation_state')
if not cred[1] then return {0} end
if cred[2] == 'rejected' then return {3} end
local n = 3
if ARGV[8] == '1' then
  local first = redis.call('HGETALL', KEYS[3])
  if #first > 0 then
    local member = ''
    for i = 1, #first, 2 do
      if first[i] == '_member' then member = first[i + 1] end
    end
    first[#first + 1] = '_live'
    first[#first + 1] = redis.call('ZSCORE', KEYS[2], member) and '1' or '0'
    return {2, unpack(first)}
  end
  n = 4
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[3], '_request', ARGV[4], '_member', ARGV[1], '_session', ARGV[6], '_memo', ARGV[7])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
if ARGV[9] == '1' then
  redis.call('SET', KEYS[n], ARGV[6], 'PX', ARGV[10])
end
return {1}
`)

// resolveScript reads a session record and, on a single Redis, the
// credential record it names, in one round trip. The credential's key is
// learnt from the session, so the script reads a key it was not given:
// a single Redis allows that, a Cluster node does not (the key may live on
// another master), so on a Cluster the two are read one after the other.
//
// KEYS[1] session key. ARGV[1] the store's key prefix.
// Reply: {} no session | {session JSON, 0} credential not read (a
// session record the script cannot follow; the caller checks it) |
// {session JSON, 1, HGETALL of the credential...} (no fields: the
// credential is gone).
var resolveScript = redis.NewScript(`
local raw = redis.call('GET', KEYS[1])
if not raw then return {} end
local ok, rec = pcall(cjson.decode, raw)
if not ok or type(rec) ~= 'table' then return {raw, 0} end
local tenant, id = rec['tenant_id'], rec['credential_id']
if type(tenant) ~= 'string' or type(id) ~= 'string' or tenant == '' or id == ''
  or string.find(tenant, '[:{}]') or string.find(id, '[:{}]') then
  return {raw, 0}
end
return {raw, 1, unpack(redis.call('HGETALL', ARGV[1] .. ':{' .. tenant .. '}:cred:' .. id))}
`)

// RedisOptions configures NewRedis.
type RedisOptions struct {
	// Prefix starts every key; default "fb". It must not contain '{' or
	// '}', which would break the hash tags.
	Prefix string
	// WaitReplicas is how many replicas must acknowledge a credential
	// write (and a revocation) before it is reported done: Redis replicates
	// asynchronously, so without it a failover can lose a write that was
	// acknowledged. 0 does not wait (a topology without replicas).
	WaitReplicas int
	// WaitTimeout bounds that wait (default 1 s); a write the replicas did
	// not acknowledge in time is reported as ErrUnavailable. It is applied
	// all the same: retry it with the same request id.
	WaitTimeout time.Duration
	// OneSlotPerCall keeps every script and multi-key command within one
	// hash slot, as on a Cluster, even through a single-node client. Off,
	// a single node (or Sentinel's master) takes one script for what a
	// Cluster needs two round trips for (CreateSession,
	// GetSessionCredential). For a proxy that shards keys behind one
	// address, and for the test that checks every command's slots.
	OneSlotPerCall bool
}

// Redis is the Store on Redis: single node, Sentinel or Cluster.
//
// Give it a client with ContextTimeoutEnabled set: without it go-redis
// bounds socket I/O by its own read/write timeouts instead of the caller's
// context deadline. Errors reaching Redis wrap ErrUnavailable (and the
// cause, e.g. context.DeadlineExceeded).
type Redis struct {
	client       redis.UniversalClient
	prefix       string
	waitReplicas int
	waitTimeout  time.Duration
	// oneNode: every key is on one Redis (a single node or Sentinel's
	// master, and not OneSlotPerCall), so one script may touch keys of
	// several slots.
	oneNode bool
}

var _ Store = (*Redis)(nil)

// NewRedis returns a Store on client. It panics if opts.Prefix contains a
// brace, a programming error that would break the cluster key layout.
func NewRedis(client redis.UniversalClient, opts RedisOptions) *Redis {
	prefix := opts.Prefix
	if prefix == "" {
		prefix = defaultPrefix
	}
	if strings.ContainsAny(prefix, "{}") {
		panic(fmt.Sprintf("store: Redis key prefix %q must not contain '{' or '}'", prefix))
	}
	wait := opts.WaitTimeout
	if wait <= 0 {
		wait = time.Second
	}
	_, oneNode := client.(*redis.Client)
	return &Redis{client: client, prefix: prefix, waitReplicas: max(opts.WaitReplicas, 0), waitTimeout: wait,
		oneNode: oneNode && !opts.OneSlotPerCall}
}

// CountReplicas returns how many replicas the topology behind client has:
// those connected to the master (Sentinel, single node), or the fewest any
// Cluster master has. It is how `auto` picks RedisOptions.WaitReplicas.
func CountReplicas(ctx context.Context, client redis.UniversalClient) (int, error) {
	count := func(ctx context.Context, c redis.Cmdable) (int, error) {
		info, err := c.Info(ctx, "replication").Result()
		if err != nil {
			return 0, mapErr(err)
		}
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "connected_slaves:"); ok {
				return strconv.Atoi(v)
			}
		}
		return 0, fmt.Errorf("store: INFO replication has no connected_slaves")
	}
	cc, ok := client.(*redis.ClusterClient)
	if !ok {
		return count(ctx, client)
	}
	var (
		mu     sync.Mutex
		fewest = -1
	)
	err := cc.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		n, err := count(ctx, node)
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		if fewest < 0 || n < fewest {
			fewest = n
		}
		return nil
	})
	return max(fewest, 0), err
}

// durable runs write on a connection of its own to the master owning key
// and then, if replicas must acknowledge, WAITs on that same connection
// (WAIT covers the writes of the connection it runs on).
func (r *Redis) durable(ctx context.Context, key string, write func(c redis.Cmdable) error) error {
	if r.waitReplicas == 0 {
		return write(r.client)
	}
	var master *redis.Client
	switch c := r.client.(type) {
	case *redis.ClusterClient:
		m, err := c.MasterForKey(ctx, key)
		if err != nil {
			return mapErr(err)
		}
		master = m
	case *redis.Client:
		master = c
	default:
		return fmt.Errorf("store: waiting for replicas needs a single-node, Sentinel or Cluster client, not %T", r.client)
	}
	conn := master.Conn()
	defer conn.Close()
	if err := write(conn); err != nil {
		return err
	}
	acked, err := conn.Wait(ctx, r.waitReplicas, r.waitTimeout).Result()
	if err != nil {
		return mapErr(err)
	}
	if acked < int64(r.waitReplicas) {
		return fmt.Errorf("%w: %d of %d replicas acknowledged the write within %s", ErrUnavailable, acked, r.waitReplicas, r.waitTimeout)
	}
	return nil
}

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

// PutCredentials implements Store: the items of one tenant (one hash
// slot) go in putBatchScript calls of up to putBatchSize items, all in one
// pipeline (one round trip, and one WAIT for the replicas after them), each
// item applied atomically by itself.
func (r *Redis) PutCredentials(ctx context.Context, items []PutItem) []PutItemResult {
	out := make([]PutItemResult, len(items))
	type call struct {
		keys []string
		args []any
	}
	calls := make([]call, len(items))
	byTenant := map[string][]int{}
	var tenants []string
	for i, it := range items {
		keys, args, err := r.putCall(it.Credential, it.Options)
		if err != nil {
			out[i].Err = err
			continue
		}
		calls[i] = call{keys, args}
		t := it.Credential.TenantID
		if _, ok := byTenant[t]; !ok {
			tenants = append(tenants, t)
		}
		byTenant[t] = append(byTenant[t], i)
	}
	for _, t := range tenants {
		idx := byTenant[t]
		var chunks [][]int
		for off := 0; off < len(idx); off += putBatchSize {
			chunks = append(chunks, idx[off:min(off+putBatchSize, len(idx))])
		}
		replies := make([]*redis.Cmd, len(chunks))
		err := r.durable(ctx, calls[idx[0]].keys[0], func(cl redis.Cmdable) error {
			return runPipelined(ctx, cl, putBatchScript, len(chunks), func(c int) ([]string, []any) {
				var keys []string
				var args []any
				for _, i := range chunks[c] {
					keys = append(keys, calls[i].keys...)
					args = append(append(args, len(calls[i].args)), calls[i].args...)
				}
				return keys, args
			}, replies)
		})
		for c, chunk := range chunks {
			var each []any
			var cerr error
			switch {
			case replies[c] == nil: // never sent
				cerr = err
			case replies[c].Err() != nil:
				cerr = mapErr(replies[c].Err())
			default:
				if each, cerr = replies[c].Slice(); cerr == nil && len(each) != len(chunk) {
					cerr = fmt.Errorf("store: %d replies for %d puts", len(each), len(chunk))
				}
			}
			for k, i := range chunk {
				if cerr != nil {
					out[i].Err = cerr
					continue
				}
				reply, ok := each[k].([]any)
				if !ok {
					out[i].Err = fmt.Errorf("store: put reply is %T, not a list", each[k])
					continue
				}
				out[i].PutResult, out[i].Err = putResult(reply, calls[i].args)
				if out[i].Err == nil && err != nil {
					// Written, but the replicas did not acknowledge it in time.
					out[i].Err = err
				}
			}
		}
	}
	return out
}

// runPipelined runs script n times in one pipeline on c, with the keys and
// arguments call(k) gives, and puts each reply in replies[k]. A script
// Redis does not know yet (NOSCRIPT) is loaded, and the calls that met it
// are sent again: they ran nothing.
func runPipelined(ctx context.Context, c redis.Cmdable, script *redis.Script, n int, call func(k int) ([]string, []any), replies []*redis.Cmd) error {
	pending := make([]int, n)
	for k := range pending {
		pending[k] = k
	}
	for attempt := 0; len(pending) > 0; attempt++ {
		pipe := c.Pipeline()
		for _, k := range pending {
			keys, args := call(k)
			replies[k] = script.EvalSha(ctx, pipe, keys, args...)
		}
		_, _ = pipe.Exec(ctx) // errors are read per command
		var again []int
		for _, k := range pending {
			if err := replies[k].Err(); err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
				again = append(again, k)
			}
		}
		if len(again) == 0 {
			return nil
		}
		if attempt > 0 {
			return fmt.Errorf("store: script still unknown to Redis after loading it")
		}
		if err := script.Load(ctx, c).Err(); err != nil {
			return mapErr(err)
		}
		pending = again
	}
	return nil
}

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

// Client is the Redis client the store uses, for state the credentials
// service shares across replicas beside the records (login budgets, the
// keep-alive's lease); Prefix is the store's key prefix.
func (r *Redis) Client() redis.UniversalClient { return r.client }

// Prefix is the prefix of the store's keys.
func (r *Redis) Prefix() string { return r.prefix }

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

// mapErr translates go-redis errors into the store's: redis.Nil is
// ErrNotFound; anything that means Redis could not serve the call (network,
// timeouts, cancelled context, closed client, a server that is loading,
// failing over or out of memory) wraps ErrUnavailable together with the
// cause; other server errors are bugs and are wrapped plainly.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, redis.Nil):
		return ErrNotFound
	case unavailable(err):
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	default:
		return fmt.Errorf("store: redis: %w", err)
	}
}

// transientPrefixes are server error codes that mean "not now".
var transientPrefixes = []string{
	"LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY",
	"NOREPLICAS", "OOM", "MOVED", "ASK", "ERR max number of clients",
}

func unavailable(err error) bool {
	var rerr redis.Error
	if !errors.As(err, &rerr) {
		return true // not a server reply: the call did not get through
	}
	for _, p := range transientPrefixes {
		if strings.HasPrefix(rerr.Error(), p) {
			return true
		}
	}
	return false
}

// splitReply splits a script reply into its status and its string payload.
func splitReply(reply []any) (int64, []string, error) {
	if len(reply) == 0 {
		return 0, nil, errors.New("store: empty script reply")
	}
	status, ok := reply[0].(int64)
	if !ok {
		return 0, nil, fmt.Errorf("store: script status is %T, not an integer", reply[0])
	}
	rest := make([]string, len(reply)-1)
	for i, v := range reply[1:] {
		s, ok := v.(string)
		if !ok {
			return 0, nil, fmt.Errorf("store: script reply element is %T, not a string", v)
		}
		rest[i] = s
	}
	return status, rest, nil
}

func pairsToMap(pairs []string) (map[string]string, error) {
	if len(pairs)%2 != 0 {
		return nil, errors.New("store: odd number of hash fields in script reply")
	}
	m := make(map[string]string, len(pairs)/2)
	for i := 0; i < len(pairs); i += 2 {
		m[pairs[i]] = pairs[i+1]
	}
	return m, nil
}

// validationFields are the hash fields a Validation sets. Empty values are
// written too, so a new outcome clears the old one's message or user.
func validationFields(v Validation) []any {
	return []any{
		fValidateTime, formatTime(v.Time),
		fValidationState, v.State,
		fValidationMessage, v.Message,
		fUpstreamUser, v.UpstreamUser,
	}
}

func parseCredential(m map[string]string) (Credential, error) {
	c := Credential{
		TenantID:          m[fTenant],
		CredentialID:      m[fID],
		Provider:          m[fProvider],
		Generation:        m[fGeneration],
		Ciphertext:        m[fCiphertext],
		Fingerprint:       m[fFingerprint],
		BaseURL:           m[fBaseURL],
		ValidationState:   m[fValidationState],
		ValidationMessage: m[fValidationMessage],
		UpstreamUser:      m[fUpstreamUser],
	}
	var errs []error
	c.Version, errs = parseInt(m[fVersion], errs)
	c.FleetUpAccountID, errs = parseInt(m[fFleetUpAccountID], errs)
	var ad int64
	ad, errs = parseInt(m[fADVersion], errs)
	c.ADVersion = max(int(ad), 1) // absent: written before versions, sealed with version 1
	c.CreateTime, errs = parseTime(m[fCreateTime], errs)
	c.UpdateTime, errs = parseTime(m[fUpdateTime], errs)
	c.ValidateTime, errs = parseTime(m[fValidateTime], errs)
	c.TokenExpireTime, errs = parseTime(m[fTokenExpireTime], errs)
	c.LastUsedTime, errs = parseTime(m[fLastUsedTime], errs)
	if c.Generation == "" && len(errs) == 0 {
		// A record written before generations existed: derive one that
		// still changes when the credential is deleted and created again.
		c.Generation = "legacy-" + strconv.FormatInt(c.CreateTime.UnixNano(), 36) + "-" + strconv.FormatInt(c.Version, 10)
	}
	if m[fLabels] != "" {
		if err := json.Unmarshal([]byte(m[fLabels]), &c.Labels); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Credential{}, fmt.Errorf("store: corrupt credential record %s/%s: %w", c.TenantID, c.CredentialID, err)
	}
	return c, nil
}

func parseInt(s string, errs []error) (int64, []error) {
	if s == "" {
		return 0, errs
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, append(errs, err)
	}
	return n, errs
}

// encodeLabels stores labels as JSON; no labels is the empty string, and
// reads back as a nil map.
func encodeLabels(labels map[string]string) (string, error) {
	if len(labels) == 0 {
		return "", nil
	}
	b, err := json.Marshal(labels)
	if err != nil {
		return "", fmt.Errorf("store: encode labels: %w", err)
	}
	return string(b), nil
}

// Times are stored as UTC RFC 3339 with nanoseconds (exact round trip);
// the zero time is the empty string.
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseTime(s string, errs []error) (time.Time, []error) {
	if s == "" {
		return time.Time{}, errs
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, append(errs, err)
	}
	return t, errs
}

func decodeSession(raw []byte) (Session, error) {
	var rec sessionRecord
	if err := json.Unmarshal(raw, &rec); err != nil {
		return Session{}, fmt.Errorf("store: decode session: %w", err)
	}
	return rec.session()
}

// sessionRecord is a Session as stored (JSON).
type sessionRecord struct {
	HandleHash   string    `json:"handle_hash"`
	SessionID    string    `json:"session_id"`
	TenantID     string    `json:"tenant_id"`
	CredentialID string    `json:"credential_id"`
	Scopes       []string  `json:"scopes,omitempty"`
	CreateTime   time.Time `json:"create_time"`
	ExpireTime   time.Time `json:"expire_time"`
	Binding      string    `json:"binding,omitempty"`
}

func newSessionRecord(s Session) sessionRecord {
	return sessionRecord{
		HandleHash:   hex.EncodeToString(s.HandleHash[:]),
		SessionID:    s.SessionID,
		TenantID:     s.TenantID,
		CredentialID: s.CredentialID,
		Scopes:       s.Scopes,
		CreateTime:   s.CreateTime.UTC(),
		ExpireTime:   s.ExpireTime.UTC(),
		Binding:      s.Binding,
	}
}

func (rec sessionRecord) session() (Session, error) {
	s := Session{
		SessionID:    rec.SessionID,
		TenantID:     rec.TenantID,
		CredentialID: rec.CredentialID,
		Scopes:       rec.Scopes,
		CreateTime:   rec.CreateTime,
		ExpireTime:   rec.ExpireTime,
		Binding:      rec.Binding,
	}
	h, err := hex.DecodeString(rec.HandleHash)
	if err != nil || len(h) != len(s.HandleHash) {
		return Session{}, fmt.Errorf("store: corrupt session record %s", rec.SessionID)
	}
	copy(s.HandleHash[:], h)
	return s, nil
}
