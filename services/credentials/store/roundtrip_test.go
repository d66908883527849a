package store_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// roundTrips counts a client's round trips to Redis: a command, or a
// pipeline, each.
type roundTrips struct{ n atomic.Int64 }

func (c *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.n.Add(1); return next(ctx, cmd) }
}
func (c *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { c.n.Add(1); return next(ctx, cmds) }
}

// sessionTopologies are the Redis shapes a store runs on, with the round
// trips IssueSession's and ResolveSession's store calls take on each: one
// where every key is on one server, two on a Cluster (a session and its
// credential live in different slots, often on different masters).
func sessionTopologies() []struct {
	name   string
	client func(t *testing.T) redis.UniversalClient
	trips  int64
} {
	return []struct {
		name   string
		client func(t *testing.T) redis.UniversalClient
		trips  int64
	}{
		{"single", func(t *testing.T) redis.UniversalClient { return testenv.Redis(t).Client(t) }, 1},
		{"sentinel", func(t *testing.T) redis.UniversalClient { return testenv.RedisSentinel(t).Client(t) }, 1},
		{"cluster", func(t *testing.T) redis.UniversalClient { return testenv.RedisShardedCluster(t).Client(t) }, 2},
		{"miniredis", func(t *testing.T) redis.UniversalClient {
			m := miniredis.RunT(t)
			c := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
			t.Cleanup(func() { _ = c.Close() })
			return c
		}, 1},
	}
}

// TestSessionRoundTrips: a new session (CreateSession, with or without a
// request id) and a resolution (GetSessionCredential) take one Redis round
// trip where every key is on one server, two on a Cluster.
func TestSessionRoundTrips(t *testing.T) {
	for _, topo := range sessionTopologies() {
		t.Run(topo.name, func(t *testing.T) {
			client := topo.client(t)
			st := store.NewRedis(client, store.RedisOptions{Prefix: testenv.RedisPrefix(t)})
			ctx := t.Context()
			c := store.Credential{TenantID: "tenant-rt", CredentialID: "cred-1", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
			if _, err := st.PutCredential(ctx, c, store.PutOptions{}); err != nil {
				t.Fatal(err)
			}
			newSession := func(i int) store.Session {
				return store.Session{HandleHash: sha256.Sum256([]byte{byte(i)}), SessionID: "s", TenantID: c.TenantID, CredentialID: c.CredentialID,
					CreateTime: time.Now(), ExpireTime: time.Now().Add(time.Minute)}
			}
			// Load the scripts first: a script's first call may take one
			// more trip (NOSCRIPT, then EVAL).
			warm := newSession(0)
			if _, err := st.CreateSession(ctx, warm, store.Request{}); err != nil {
				t.Fatal(err)
			}
			if _, _, err := st.GetSessionCredential(ctx, warm.HandleHash); err != nil {
				t.Fatal(err)
			}
			counter := &roundTrips{}
			client.AddHook(counter)
			count := func(what string, call func() error) {
				t.Helper()
				before := counter.n.Load()
				if err := call(); err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				if got := counter.n.Load() - before; got != topo.trips {
					t.Errorf("%s took %d round trips, want %d", what, got, topo.trips)
				}
			}
			for i, req := range []store.Request{{}, {ID: "issue-rt", Hash: "h"}} {
				s := newSession(i + 1)
				count("CreateSession (request id "+req.ID+")", func() error { _, err := st.CreateSession(ctx, s, req); return err })
				count("GetSessionCredential", func() error {
					got, cred, err := st.GetSessionCredential(ctx, s.HandleHash)
					if err == nil && (got.SessionID != s.SessionID || cred == nil || cred.CredentialID != c.CredentialID) {
						err = errors.New("wrong session or credential")
					}
					return err
				})
			}
		})
	}
}

// TestSessionCredentialGone: a session key a crash left behind after its
// credential was deleted (DeleteCredential removes the record before the
// session keys) resolves to the session and no credential, on every
// topology; a record the store cannot read is an error, as GetSession's.
func TestSessionCredentialGone(t *testing.T) {
	for _, topo := range sessionTopologies() {
		t.Run(topo.name, func(t *testing.T) {
			client := topo.client(t)
			prefix := testenv.RedisPrefix(t)
			st := store.NewRedis(client, store.RedisOptions{Prefix: prefix})
			ctx := t.Context()
			c := store.Credential{TenantID: "tenant-gone", CredentialID: "cred-1", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
			if _, err := st.PutCredential(ctx, c, store.PutOptions{}); err != nil {
				t.Fatal(err)
			}
			s := store.Session{HandleHash: sha256.Sum256([]byte("left behind")), SessionID: "s-left", TenantID: c.TenantID, CredentialID: c.CredentialID,
				CreateTime: time.Now(), ExpireTime: time.Now().Add(time.Minute)}
			if _, err := st.CreateSession(ctx, s, store.Request{}); err != nil {
				t.Fatal(err)
			}
			if err := client.Del(ctx, prefix+":{tenant-gone}:cred:cred-1").Err(); err != nil {
				t.Fatal(err)
			}
			got, cred, err := st.GetSessionCredential(ctx, s.HandleHash)
			if err != nil || cred != nil || got.SessionID != s.SessionID {
				t.Errorf("GetSessionCredential of a session whose credential is gone = %+v, %v, %v; want the session, no credential", got, cred, err)
			}

			bad := sha256.Sum256([]byte("corrupt"))
			if err := client.Set(ctx, prefix+":sess:"+hex.EncodeToString(bad[:]), "not json", time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			_, _, err = st.GetSessionCredential(ctx, bad)
			_, getErr := st.GetSession(ctx, bad)
			if err == nil || getErr == nil {
				t.Errorf("a corrupt session record: GetSessionCredential %v, GetSession %v; want both to fail", err, getErr)
			}
		})
	}
}

// TestPutCredentialsOneRoundTrip: a batch of puts of one tenant takes one
// Redis round trip on every topology (its keys share the tenant's slot).
func TestPutCredentialsOneRoundTrip(t *testing.T) {
	for _, topo := range sessionTopologies() {
		t.Run(topo.name, func(t *testing.T) {
			client := topo.client(t)
			st := store.NewRedis(client, store.RedisOptions{Prefix: testenv.RedisPrefix(t)})
			ctx := t.Context()
			batch := func(from int) []store.PutItem {
				items := make([]store.PutItem, 50)
				for i := range items {
					items[i] = store.PutItem{Credential: store.Credential{TenantID: "tenant-rt", CredentialID: "c" + strconv.Itoa(from+i),
						Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}}
				}
				return items
			}
			for _, r := range st.PutCredentials(ctx, batch(0)) { // loads the script
				if r.Err != nil {
					t.Fatal(r.Err)
				}
			}
			counter := &roundTrips{}
			client.AddHook(counter)
			for _, r := range st.PutCredentials(ctx, batch(100)) {
				if r.Err != nil || !r.Created {
					t.Fatalf("%+v", r)
				}
			}
			if got := counter.n.Load(); got != 1 {
				t.Errorf("50 puts took %d round trips, want 1", got)
			}
		})
	}
}

// TestPutCredentialsItemFailsAlone: an item the script cannot write (its
// record key holds another type) fails with an error of its own; the items
// around it are written.
func TestPutCredentialsItemFailsAlone(t *testing.T) {
	for _, topo := range sessionTopologies() {
		t.Run(topo.name, func(t *testing.T) {
			client := topo.client(t)
			prefix := testenv.RedisPrefix(t)
			st := store.NewRedis(client, store.RedisOptions{Prefix: prefix})
			ctx := t.Context()
			if err := client.Set(ctx, prefix+":{tenant-x}:cred:broken", "not a hash", time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			var items []store.PutItem
			for _, id := range []string{"before", "broken", "after"} {
				items = append(items, store.PutItem{Credential: store.Credential{TenantID: "tenant-x", CredentialID: id, Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}})
			}
			res := st.PutCredentials(ctx, items)
			if res[0].Err != nil || res[2].Err != nil || !res[0].Created || !res[2].Created {
				t.Errorf("items around the broken one: %+v, %+v", res[0], res[2])
			}
			if res[1].Err == nil || errors.Is(res[1].Err, store.ErrUnavailable) {
				t.Errorf("the broken item: %v, want an error of its own", res[1].Err)
			}
		})
	}
}
