package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// autoRequestWindow keeps the request record of a write whose caller gave
// no request id: long enough for the client's own retry of that write.
const autoRequestWindow = time.Minute

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

// Client is the Redis client the store uses, for state the credentials
// service shares across replicas beside the records (login budgets, the
// keep-alive's lease); Prefix is the store's key prefix.
func (r *Redis) Client() redis.UniversalClient { return r.client }

// Prefix is the prefix of the store's keys.
func (r *Redis) Prefix() string { return r.prefix }

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
