package telemetry

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/extra/redisotel/v9"
	"github.com/redis/go-redis/v9"
)

// redisCommands are the Redis commands fleetbroker and its libraries
// (redis_rate, the Lua scripts) use, and common neighbours. The label is
// the command name only, never a key or an argument: keys hold tenant ids.
var redisCommands = set(
	"get", "set", "setnx", "getdel", "getex", "mget", "mset", "del", "unlink", "exists",
	"expire", "pexpire", "expireat", "pexpireat", "ttl", "pttl", "persist", "incr", "incrby", "decr", "decrby",
	"hget", "hset", "hsetnx", "hmget", "hmset", "hgetall", "hdel", "hexists", "hlen", "hincrby", "hkeys", "hvals",
	"sadd", "srem", "smembers", "sismember", "scard",
	"zadd", "zrem", "zscore", "zcard", "zrange", "zrangebyscore", "zrevrange", "zremrangebyscore", "zremrangebyrank",
	"lpush", "rpush", "lpop", "rpop", "lrange", "ltrim", "llen",
	"eval", "evalsha", "eval_ro", "evalsha_ro", "script", "scan", "sscan", "hscan", "zscan",
	"watch", "unwatch", "multi", "exec", "ping", "info", "time", "publish",
	// Sent by go-redis itself when it opens a connection.
	"hello", "client", "auth", "select", "readonly", "cluster", "sentinel", "command",
)

// RedisHook returns a go-redis hook that records
// fleetbroker_redis_command_duration_seconds{command, result} for every
// command (result: ok, nil for a missing key, error) and for every pipeline
// as a whole (command="pipeline"). Add it to each client:
// rdb.AddHook(m.RedisHook()). It works for single node, Sentinel and Cluster
// clients alike. With a nil m it records nothing.
func (m *Metrics) RedisHook() redis.Hook { return redisHook{m: m} }

type redisHook struct{ m *Metrics }

func (h redisHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h redisHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	if h.m == nil {
		return next
	}
	return func(ctx context.Context, cmd redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmd)
		h.observe(bounded(cmd.Name(), redisCommands), err, time.Since(start))
		return err
	}
}

func (h redisHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	if h.m == nil {
		return next
	}
	return func(ctx context.Context, cmds []redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmds)
		h.observe("pipeline", err, time.Since(start))
		return err
	}
}

func (h redisHook) observe(command string, err error, took time.Duration) {
	r := resultOK
	switch {
	case errors.Is(err, redis.Nil):
		r = "nil"
	case err != nil:
		r = resultError
	}
	h.m.redis.WithLabelValues(command, r).Observe(took.Seconds())
}

// InstrumentRedisTracing adds OpenTelemetry spans for every Redis command of
// rdb (one span per command or pipeline, named by the command). Statements
// are not recorded: the default of redisotel would put every command with
// its keys and values — tenant ids, sealed tokens, handle hashes — into the
// span. The caller position is not recorded either (it costs a stack walk
// per command and says nothing about the broker). Spans go to the global
// tracer provider, so this is harmless when SetupTracing left tracing off.
func InstrumentRedisTracing(rdb redis.UniversalClient) error {
	return redisotel.InstrumentTracing(rdb, redisotel.WithDBStatement(false), redisotel.WithCallerEnabled(false))
}
