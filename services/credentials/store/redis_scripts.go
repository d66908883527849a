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

// putScript creates or replaces a record in one step, so concurrent puts
// serialize in Redis and every put gets its own version. A request seen
// before returns its first result and changes nothing but a replay count,
// so a second run of the same put (a retry after a lost reply) does not add
// another version; counting is a write, so a WAIT after the replay also
// waits for the first run's write to reach the replicas.
//
// KEYS[1] record, KEYS[2] tenant index, KEYS[3] request record.
// ARGV[1] credential id, ARGV[2] create time for a new record,
// ARGV[3] request hash, ARGV[4] request window (ms), ARGV[5] expected
// version (” for any, '0' for none), ARGV[6..] the other field/value pairs.
// Reply: {created (0|1), HGETALL of the stored record...} |
// {2, HGETALL of the request record...} replay | {-1} version differs.
var putScript = redis.NewScript(`
local first = redis.call('HGETALL', KEYS[3])
if #first > 0 then
  -- A write, so a WAIT after the replay also covers the first run's write.
  redis.call('HINCRBY', KEYS[3], '_replays', 1)
  return {2, unpack(first)}
end
local created = 0
local version = 1
local createTime = ARGV[2]
local old = redis.call('HMGET', KEYS[1], 'version', 'create_time')
if ARGV[5] ~= '' and tonumber(old[1] or '0') ~= tonumber(ARGV[5]) then return {-1} end
if old[1] then
  version = tonumber(old[1]) + 1
  createTime = old[2] or createTime
  -- Start from an empty hash so no field of the old record survives.
  redis.call('DEL', KEYS[1])
else
  created = 1
end
redis.call('HSET', KEYS[1], 'version', tostring(version), 'create_time', createTime, unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local rec = redis.call('HGETALL', KEYS[1])
-- The first result, for a repeat of this request: the record's metadata
-- (its ciphertext is not needed to answer, and is not copied).
local result = {'_request', ARGV[3], '_created', tostring(created)}
for i = 1, #rec, 2 do
  if rec[i] ~= 'ciphertext' then
    result[#result + 1] = rec[i]
    result[#result + 1] = rec[i + 1]
  end
end
redis.call('HSET', KEYS[3], unpack(result))
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return {created, unpack(rec)}
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

// addSessionScript registers a session with its credential, if the
// credential exists, and prunes sessions that have expired.
//
// KEYS[1] record, KEYS[2] session set.
// ARGV[1] session hex, ARGV[2] expiry (Unix ms), ARGV[3] now (Unix ms).
// Reply: {1} | {0} credential missing.
var addSessionScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {1}
`)

// issueScript is addSessionScript for a request with an id: the first run
// also stores the session record and the caller's memo under the request;
// a later run returns them, and whether the first session is still listed
// (not revoked since), without registering anything.
//
// KEYS[1] record, KEYS[2] session set, KEYS[3] request record.
// ARGV[1] session hex, ARGV[2] expiry (Unix ms), ARGV[3] now (Unix ms),
// ARGV[4] request hash, ARGV[5] window (ms), ARGV[6] session record (JSON),
// ARGV[7] memo.
// Reply: {1} | {0} credential missing | {2, HGETALL of the request
// record..., '_live', 0|1} replay.
var issueScript = redis.NewScript(`
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
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], '_request', ARGV[4], '_member', ARGV[1], '_session', ARGV[6], '_memo', ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return {1}
`)
