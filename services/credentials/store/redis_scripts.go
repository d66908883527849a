package store

import (
	"github.com/redis/go-redis/v9"
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
