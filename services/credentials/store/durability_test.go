package store_test

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/credentials/store/storetest"
)

// TestRedisRetryAfterLostReplyAppliesOnce reproduces how go-redis applied a
// put twice: the reply to the put script is lost (a proxy swallows it), the
// client's read times out, and go-redis (MaxRetries at its default of 3)
// sends the script again on a new connection. The second run must be a
// no-op that returns the first result: created, version 1, not
// "created=false version=2" for a brand-new id. The same for a delete,
// whose second run must not answer NOT_FOUND.
func TestRedisRetryAfterLostReplyAppliesOnce(t *testing.T) {
	srv := testenv.Redis(t)
	prefix := testenv.RedisPrefix(t)
	direct := store.NewRedis(srv.Client(t), store.RedisOptions{Prefix: prefix})
	ctx := t.Context()
	// Load the scripts, so the first EVALSHA through the proxy runs the
	// script rather than answering NOSCRIPT.
	warm := store.Credential{TenantID: "acme", CredentialID: "warm", Provider: store.ProviderWialon, Ciphertext: "vault:v1:w"}
	if _, err := direct.PutCredential(ctx, warm, store.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.DeleteCredential(ctx, "acme", "warm", store.Request{}); err != nil {
		t.Fatal(err)
	}

	retrying := func(t *testing.T, proxy string) *store.Redis {
		client := redis.NewClient(&redis.Options{
			Addr:                  proxy,
			ReadTimeout:           300 * time.Millisecond,
			MaxRetries:            3, // go-redis's default, as production had it
			ContextTimeoutEnabled: true,
		})
		t.Cleanup(func() { _ = client.Close() })
		return store.NewRedis(client, store.RedisOptions{Prefix: prefix})
	}

	c := store.Credential{TenantID: "acme", CredentialID: "brand-new", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
	proxy, swallowed := lossyProxy(t, srv.Addr, "EVALSHA")
	res, err := retrying(t, proxy).PutCredential(ctx, c, store.PutOptions{})
	assertSwallowed(t, swallowed)
	if err != nil || !res.Created || res.Credential.Version != 1 {
		t.Fatalf("PutCredential through a lost reply = created %v, version %d, %v; want created, version 1", res.Created, res.Credential.Version, err)
	}
	got, err := direct.GetCredential(ctx, "acme", "brand-new")
	if err != nil || got.Version != 1 {
		t.Fatalf("stored version %d, %v; want 1: the put was applied twice", got.Version, err)
	}

	session := store.Session{HandleHash: [32]byte{7}, SessionID: "s", TenantID: "acme", CredentialID: "brand-new",
		CreateTime: time.Now(), ExpireTime: time.Now().Add(time.Minute)}
	if _, err := direct.CreateSession(ctx, session, store.Request{}); err != nil {
		t.Fatal(err)
	}
	proxy, swallowed = lossyProxy(t, srv.Addr, "EVALSHA")
	del, err := retrying(t, proxy).DeleteCredential(ctx, "acme", "brand-new", store.Request{})
	assertSwallowed(t, swallowed)
	if err != nil || del.Revoked != 1 {
		t.Fatalf("DeleteCredential through a lost reply = %+v, %v; want 1 session revoked", del, err)
	}
}

func assertSwallowed(t *testing.T, swallowed <-chan struct{}) {
	t.Helper()
	select {
	case <-swallowed:
	default:
		t.Fatal("the proxy never swallowed a reply: the test did not exercise a retry")
	}
}

// lossyProxy forwards TCP to target, except that it swallows every reply on
// the first connection that sends a command containing trigger (from that
// command on), as a network that loses the reply would. The client times
// out and, if it retries, does so on a new connection, which is forwarded
// faithfully. The returned channel is closed once a reply was swallowed.
func lossyProxy(t *testing.T, target, trigger string) (string, <-chan struct{}) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	var (
		chosen    atomic.Bool
		swallowed = make(chan struct{})
		once      sync.Once
	)
	go func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			var lossy atomic.Bool
			closeBoth := func() { _ = client.Close(); _ = server.Close() }
			go func() {
				defer closeBoth()
				buf := make([]byte, 64<<10)
				for {
					n, err := client.Read(buf)
					if n > 0 {
						if bytes.Contains(bytes.ToUpper(buf[:n]), []byte(trigger)) && chosen.CompareAndSwap(false, true) {
							lossy.Store(true) // before the command reaches the server
						}
						if _, err := server.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
			go func() {
				defer closeBoth()
				buf := make([]byte, 64<<10)
				for {
					n, err := server.Read(buf)
					if n > 0 {
						if lossy.Load() {
							once.Do(func() { close(swallowed) })
						} else if _, err := client.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return l.Addr().String(), swallowed
}

// TestRedisSentinelConformanceWaitingForReplicas runs the conformance
// suite through the Sentinel deployment with every credential write and
// revocation waiting for its replica (WAIT 1), as production does where the
// topology has one.
func TestRedisSentinelConformanceWaitingForReplicas(t *testing.T) {
	t.Parallel()
	d := testenv.RedisSentinel(t)
	n, err := store.CountReplicas(t.Context(), d.Client(t))
	if err != nil || n != 1 {
		t.Fatalf("CountReplicas(sentinel) = %d, %v; want 1", n, err)
	}
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		st := store.NewRedis(d.Client(t), store.RedisOptions{Prefix: testenv.RedisPrefix(t), WaitReplicas: n, WaitTimeout: 5 * time.Second})
		return storetest.Harness{Store: st}
	})
}

func TestCountReplicas(t *testing.T) {
	for _, tc := range []struct {
		name   string
		client func(t *testing.T) redis.UniversalClient
		want   int
	}{
		{"single node", func(t *testing.T) redis.UniversalClient { return testenv.Redis(t).Client(t) }, 0},
		{"cluster without replicas", func(t *testing.T) redis.UniversalClient { return testenv.RedisShardedCluster(t).Client(t) }, 0},
		{"sentinel", func(t *testing.T) redis.UniversalClient { return testenv.RedisSentinel(t).Client(t) }, 1},
		{"own master with a replica", func(t *testing.T) redis.UniversalClient {
			m := testenv.RedisOwn(t)
			testenv.RedisOwn(t, m.Addr)
			return m.Client(t)
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := store.CountReplicas(t.Context(), tc.client(t))
			if err != nil || got != tc.want {
				t.Fatalf("CountReplicas = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

// TestRedisDurableWritesWaitOnTheirConnection watches the Sentinel master
// (MONITOR) while the store works through the Sentinel client with
// WaitReplicas 1: every credential write and every revocation is followed,
// on the same connection and before anything else, by WAIT 1 — WAIT only
// covers the writes of the connection it runs on.
func TestRedisDurableWritesWaitOnTheirConnection(t *testing.T) {
	d := testenv.RedisSentinel(t)
	prefix := testenv.RedisPrefix(t)
	lines := monitor(t, d.Nodes[0])
	client := d.Client(t)
	exerciseStore(t, store.NewRedis(client, store.RedisOptions{Prefix: prefix, WaitReplicas: 1, WaitTimeout: 5 * time.Second}), "tenant-a")
	done := prefix + ":monitor-done"
	if err := client.Get(t.Context(), done).Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET %s: %v", done, err)
	}

	durable := map[string]string{} // script SHA1 -> name
	for sha, name := range store.DurableScriptHashes {
		durable[sha] = name
	}
	pending := map[string]string{} // source -> the write awaiting its WAIT
	waited := map[string]int{}
	for cmd := range commandsUntil(t, lines, done) {
		if cmd.source == "lua" {
			continue
		}
		name := strings.ToUpper(cmd.args[0])
		write := ""
		switch name {
		case "EVALSHA":
			write = durable[cmd.args[1]]
		case "EVAL":
			sum := sha1.Sum([]byte(cmd.args[1]))
			write = durable[hex.EncodeToString(sum[:])]
		case "GETDEL":
			if strings.HasPrefix(cmd.args[1], prefix+":sess:") {
				write = "revoke"
			}
		}
		switch {
		case write != "":
			pending[cmd.source] = write
		case name == "WAIT":
			if w, ok := pending[cmd.source]; ok {
				if len(cmd.args) < 2 || cmd.args[1] != "1" {
					t.Errorf("%s was followed by %q, want WAIT 1", w, cmd.args)
				}
				waited[w]++
				delete(pending, cmd.source)
			}
		default:
			if w, ok := pending[cmd.source]; ok {
				t.Errorf("%s on %s was followed by %s, not WAIT", w, cmd.source, cmd.args[0])
				delete(pending, cmd.source)
			}
		}
	}
	for source, w := range pending {
		t.Errorf("%s on %s was never followed by WAIT", w, source)
	}
	// exerciseStore: 2 puts, 2 cas (validation, ciphertext), 1 revoke, 1 delete.
	for w, want := range map[string]int{"put": 2, "cas": 2, "revoke": 1, "delete": 1} {
		if waited[w] != want {
			t.Errorf("%d %s writes waited, want %d (all: %v)", waited[w], w, want, waited)
		}
	}
}

// TestRedisWriteNotOnAReplicaIsNotAcknowledged freezes the only replica: a
// credential write cannot be confirmed on it, so it is reported
// unavailable, within the wait timeout, rather than OK. Once the replica is
// back, retrying with the same request id returns the first result, which
// is now replicated, and applies nothing twice.
func TestRedisWriteNotOnAReplicaIsNotAcknowledged(t *testing.T) {
	master := testenv.RedisOwn(t)
	replica := testenv.RedisOwn(t, master.Addr)
	const wait = 300 * time.Millisecond
	st := store.NewRedis(master.Client(t), store.RedisOptions{WaitReplicas: 1, WaitTimeout: wait})
	ctx := t.Context()
	c := store.Credential{TenantID: "acme", CredentialID: "c1", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
	if _, err := st.PutCredential(ctx, c, store.PutOptions{}); err != nil {
		mi, _ := master.Client(t).Info(ctx, "replication").Result()
		ri, _ := replica.Client(t).Info(ctx, "replication").Result()
		t.Fatalf("put with the replica up: %v\nmaster:%s\nreplica:%s", err, mi, ri)
	}

	replica.Freeze(t)
	req := store.PutOptions{Request: store.Request{ID: "rotate-1", Hash: "h"}}
	c.Ciphertext = "vault:v1:rotated"
	start := time.Now()
	_, err := st.PutCredential(ctx, c, req)
	took := time.Since(start)
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("put with the replica frozen = %v, want ErrUnavailable", err)
	}
	if took > wait+time.Second {
		t.Errorf("the unacknowledged put took %s, want about the wait timeout %s", took, wait)
	}
	for name, call := range map[string]func() error{
		"SetValidation": func() error {
			_, err := st.SetValidation(ctx, "acme", "c1", 2, store.Validation{State: store.ValidationValid, Time: time.Now()})
			return err
		},
		"UpdateCiphertext": func() error { return st.UpdateCiphertext(ctx, "acme", "c1", 2, "vault:v2:x", 2) },
	} {
		if err := call(); !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s with the replica frozen = %v, want ErrUnavailable", name, err)
		}
	}

	replica.Thaw(t)
	res, err := st.PutCredential(ctx, c, req)
	if err != nil || !res.Replayed || res.Created || res.Credential.Version != 2 {
		t.Fatalf("retry with the same request id = %+v, %v; want the first result (version 2), replicated", res, err)
	}
	onReplica, err := store.NewRedis(replica.Client(t), store.RedisOptions{}).GetCredential(ctx, "acme", "c1")
	if err != nil || onReplica.Version != 2 || onReplica.Ciphertext != "vault:v2:x" {
		t.Fatalf("replica holds version %d (%s), %v; want version 2 with the updated ciphertext", onReplica.Version, onReplica.Ciphertext, err)
	}
}

// TestRedisClusterWritesWaitOnTheirMaster drives the WAIT path through a
// Cluster of masters without replicas: each tenant's script and its WAIT
// must run on the master that owns the tenant's slot (a wrong node would
// answer MOVED), and, with no replica to acknowledge, the write is applied
// but reported unavailable.
func TestRedisClusterWritesWaitOnTheirMaster(t *testing.T) {
	d := testenv.RedisShardedCluster(t)
	prefix := testenv.RedisPrefix(t)
	waiting := store.NewRedis(d.Client(t), store.RedisOptions{Prefix: prefix, WaitReplicas: 1, WaitTimeout: 50 * time.Millisecond})
	plain := store.NewRedis(d.Client(t), store.RedisOptions{Prefix: prefix})
	ctx := t.Context()
	for i := range 6 { // tenants spread over the masters
		tenant := "tenant-" + string(rune('a'+i))
		c := store.Credential{TenantID: tenant, CredentialID: "c1", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
		_, err := waiting.PutCredential(ctx, c, store.PutOptions{})
		if !errors.Is(err, store.ErrUnavailable) || !strings.Contains(err.Error(), "0 of 1 replicas") {
			t.Fatalf("%s: put waiting for a replica that does not exist = %v, want the WAIT to report 0 of 1", tenant, err)
		}
		if got, err := plain.GetCredential(ctx, tenant, "c1"); err != nil || got.Version != 1 {
			t.Fatalf("%s: the write was not applied on its master: %+v, %v", tenant, got, err)
		}
	}
}
