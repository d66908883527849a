package store_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/credentials/store/storetest"
)

// TestMain stops the Redis deployments after the tests and removes their
// directories; without it they would die with the binary but leave their
// directories behind.
func TestMain(m *testing.M) { testenv.Main(m) }

// redisTarget is a Redis deployment from testenv.
type redisTarget interface {
	Client(t testing.TB) redis.UniversalClient
}

// redisHarness gives each test its own key prefix on a shared deployment.
// The clock is the real one, so Advance (nil) sleeps.
func redisHarness(srv redisTarget) func(t *testing.T) storetest.Harness {
	return func(t *testing.T) storetest.Harness {
		st := store.NewRedis(srv.Client(t), store.RedisOptions{Prefix: testenv.RedisPrefix(t)})
		return storetest.Harness{Store: st}
	}
}

// The suites on the three Redis shapes run in parallel with each other:
// most of their time is spent waiting for sessions to expire.
func TestRedisConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, redisHarness(testenv.Redis(t)))
}

// TestRedisClusterConformance runs the suite on a Cluster of three masters,
// as deployed. Each node rejects any script or multi-key command whose keys
// span slots (CROSSSLOT) and any script touching a key it did not declare;
// the ClusterClient follows MOVED redirections, each script runs on the
// master owning its tenant, and ForEachCredential must walk every master.
func TestRedisClusterConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, redisHarness(testenv.RedisShardedCluster(t)))
}

// TestRedisSentinelConformance runs the suite through a client that finds
// the master by asking the Sentinels.
func TestRedisSentinelConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, redisHarness(testenv.RedisSentinel(t)))
}

// TestRedisShardedClusterSpreadsTenants drives every Store method for
// several tenants on the three-master cluster. The tenants' slots lie on
// different masters, so a script or multi-key command whose keys strayed
// from its tenant's slot fails with CROSSSLOT (and the test with it), and
// ForEachCredential only finds every record if it visits every master.
func TestRedisShardedClusterSpreadsTenants(t *testing.T) {
	prefix := testenv.RedisPrefix(t)
	client, ok := testenv.RedisShardedCluster(t).Client(t).(*redis.ClusterClient)
	if !ok {
		t.Fatal("the sharded cluster's client is not a *redis.ClusterClient")
	}
	st := store.NewRedis(client, store.RedisOptions{Prefix: prefix})
	ctx := t.Context()
	tenants := map[string]bool{}
	for i := range 12 {
		tenant := fmt.Sprintf("tenant-%02d", i)
		tenants[tenant] = true
		exerciseStore(t, st, tenant)
		// exerciseStore deletes its credential; leave one behind, with a
		// session, for the walk and the key census below.
		c := store.Credential{TenantID: tenant, CredentialID: "kept", Provider: store.ProviderFleetUp, Ciphertext: "vault:v1:x"}
		if _, err := st.PutCredential(ctx, c, store.PutOptions{}); err != nil {
			t.Fatalf("PutCredential: %v", err)
		}
		s := store.Session{
			HandleHash: sha256.Sum256([]byte(tenant + "/kept")), SessionID: "kept",
			TenantID: tenant, CredentialID: c.CredentialID,
			CreateTime: time.Now(), ExpireTime: time.Now().Add(time.Minute),
		}
		if _, err := st.CreateSession(ctx, s, store.Request{}); err != nil {
			t.Fatalf("CreateSession: %v", err)
		}
	}

	walked := map[string]bool{}
	if err := st.ForEachCredential(ctx, func(c store.Credential) error {
		walked[c.TenantID] = true
		return nil
	}); err != nil {
		t.Fatalf("ForEachCredential: %v", err)
	}
	if !maps.Equal(walked, tenants) {
		t.Errorf("ForEachCredential saw tenants %v, want %v", slices.Sorted(maps.Keys(walked)), slices.Sorted(maps.Keys(tenants)))
	}

	// Which master holds each tenant's keys (those with a hash tag).
	var mu sync.Mutex
	masterOf := map[string]map[string]bool{} // tenant -> master addresses
	err := client.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		iter := node.Scan(ctx, 0, prefix+":{*", 1000).Iterator()
		for iter.Next(ctx) {
			tag := strings.TrimPrefix(iter.Val(), prefix+":{")
			tenant, _, _ := strings.Cut(tag, "}")
			mu.Lock()
			if masterOf[tenant] == nil {
				masterOf[tenant] = map[string]bool{}
			}
			masterOf[tenant][node.Options().Addr] = true
			mu.Unlock()
		}
		return iter.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	masters := map[string]bool{}
	for tenant := range tenants {
		if len(masterOf[tenant]) != 1 {
			t.Errorf("tenant %s has keys on masters %v, want exactly one", tenant, masterOf[tenant])
		}
		maps.Copy(masters, masterOf[tenant])
	}
	t.Logf("%d tenants on %d masters", len(tenants), len(masters))
	if len(masters) < 2 {
		t.Errorf("all %d tenants landed on masters %v; the test needs at least two", len(tenants), masters)
	}
}

// TestRedisKeysStayInOneSlot watches every command the store sends (and
// every command its scripts run) through MONITOR and checks, with our own
// CRC16, that the keys of each command hash to one slot, and that scripts
// declare every key they are given: the store as a Cluster runs it
// (OneSlotPerCall). Through a single-node client without that option,
// CreateSession and GetSessionCredential each take one script that spans
// slots (TestSessionRoundTrips).
func TestRedisKeysStayInOneSlot(t *testing.T) {
	srv := testenv.Redis(t)
	prefix := testenv.RedisPrefix(t)
	lines := monitor(t, srv.Addr)
	client := srv.Client(t)
	exerciseStore(t, store.NewRedis(client, store.RedisOptions{Prefix: prefix, OneSlotPerCall: true}), "tenant-a")
	done := prefix + ":monitor-done"
	if err := client.Get(t.Context(), done).Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET %s: %v", done, err)
	}

	var scripts, multiKey int
	keys := map[string]bool{}
	for cmd := range commandsUntil(t, lines, done) {
		var own []string // arguments that are our keys
		for _, a := range cmd.args {
			if strings.HasPrefix(a, prefix+":") {
				own = append(own, a)
				keys[a] = true
			}
		}
		if name := strings.ToUpper(cmd.args[0]); cmd.source != "lua" && (name == "EVAL" || name == "EVALSHA") {
			scripts++
			declared := scriptKeys(t, cmd.args)
			if len(declared) != len(own) {
				t.Errorf("script call passes keys %q but declares only %q", own, declared)
			}
		}
		if len(own) < 2 {
			continue
		}
		multiKey++
		for _, k := range own[1:] {
			if keySlot(k) != keySlot(own[0]) {
				t.Errorf("%s (%s): keys %q (slot %d) and %q (slot %d) differ",
					cmd.args[0], cmd.source, own[0], keySlot(own[0]), k, keySlot(k))
			}
		}
	}
	// exerciseStore runs each of the four scripts; from inside them come
	// further multi-key commands.
	if scripts < 6 || multiKey < 6 {
		t.Fatalf("saw %d script calls and %d multi-key commands; MONITOR missed the traffic", scripts, multiKey)
	}
	assertSlotsMatchServer(t, keys)
}

// exerciseStore calls every Store method once or more, for one tenant.
func exerciseStore(t *testing.T, st store.Store, tenant string) {
	t.Helper()
	ctx := t.Context()
	c := store.Credential{TenantID: tenant, CredentialID: "cred-1", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x"}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	_, err := st.PutCredential(ctx, c, store.PutOptions{})
	must("PutCredential", err)
	_, err = st.PutCredential(ctx, c, store.PutOptions{Request: store.Request{ID: "req-1", Hash: "h"}})
	must("PutCredential", err)
	_, err = st.GetCredential(ctx, c.TenantID, c.CredentialID)
	must("GetCredential", err)
	_, _, err = st.ListCredentials(ctx, c.TenantID, 10, "")
	must("ListCredentials", err)
	_, err = st.SetValidation(ctx, c.TenantID, c.CredentialID, 2, store.Validation{State: store.ValidationValid, Time: time.Now()})
	must("SetValidation", err)
	must("UpdateCiphertext", st.UpdateCiphertext(ctx, c.TenantID, c.CredentialID, 2, "vault:v2:x", 2))
	must("ForEachCredential", st.ForEachCredential(ctx, func(store.Credential) error { return nil }))
	var sessions []store.Session
	for i := range 3 {
		s := store.Session{
			HandleHash: sha256.Sum256([]byte(tenant + "/" + strconv.Itoa(i))), SessionID: "s" + strconv.Itoa(i),
			TenantID: c.TenantID, CredentialID: c.CredentialID,
			CreateTime: time.Now(), ExpireTime: time.Now().Add(time.Minute),
		}
		_, err := st.CreateSession(ctx, s, store.Request{ID: "issue-" + strconv.Itoa(i%2), Hash: "h"})
		must("CreateSession", err)
		sessions = append(sessions, s)
	}
	_, err = st.GetSession(ctx, sessions[0].HandleHash)
	must("GetSession", err)
	_, _, err = st.GetSessionCredential(ctx, sessions[0].HandleHash)
	must("GetSessionCredential", err)
	_, err = st.DeleteSession(ctx, sessions[0].HandleHash)
	must("DeleteSession", err)
	del, err := st.DeleteCredential(ctx, c.TenantID, c.CredentialID, store.Request{ID: "del-1", Hash: "h"})
	must("DeleteCredential", err)
	// Sessions 0 and 2 share a request id: the second is a replay of the
	// first, and the first was revoked; only session 1 was live.
	if del.Revoked != 1 {
		t.Fatalf("DeleteCredential revoked %d sessions, want 1", del.Revoked)
	}
}

// assertSlotsMatchServer checks keySlot against CLUSTER KEYSLOT of a real
// cluster node (any node answers for every key), so the slot test above
// does not rest on our CRC16 alone.
func assertSlotsMatchServer(t *testing.T, keys map[string]bool) {
	t.Helper()
	if got := crc16([]byte("123456789")); got != 0x31c3 {
		t.Fatalf("crc16(123456789) = %#x, want 0x31c3 (CRC-16/XMODEM)", got)
	}
	node := redis.NewClient(&redis.Options{Addr: testenv.RedisShardedCluster(t).Nodes[0]})
	t.Cleanup(func() { _ = node.Close() })
	for k := range keys {
		want, err := node.ClusterKeySlot(t.Context(), k).Result()
		if err != nil {
			t.Fatalf("CLUSTER KEYSLOT %s: %v", k, err)
		}
		if got := keySlot(k); int64(got) != want {
			t.Errorf("keySlot(%q) = %d, server says %d", k, got, want)
		}
	}
}

// TestRedisUnavailable checks that a Redis that cannot be reached, or does
// not answer, surfaces as store.ErrUnavailable from every method, within
// the caller's deadline.
func TestRedisUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name        string
		addr        string
		readTimeout time.Duration
		ctxTimeout  time.Duration
		within      time.Duration // each call must fail this fast
	}{
		{"connection refused", closedAddr(t), time.Second, 10 * time.Second, time.Second},
		{"no answer within read timeout", silentAddr(t), 100 * time.Millisecond, 10 * time.Second, time.Second},
		// The read timeout is far off: only the context can end these calls.
		{"no answer within context deadline", silentAddr(t), 5 * time.Second, 200 * time.Millisecond, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client := redis.NewClient(&redis.Options{
				Addr:                  tc.addr,
				DialTimeout:           200 * time.Millisecond,
				DialerRetries:         1,
				ReadTimeout:           tc.readTimeout,
				WriteTimeout:          tc.readTimeout,
				MaxRetries:            -1,
				ContextTimeoutEnabled: true,
			})
			t.Cleanup(func() { _ = client.Close() })
			st := store.NewRedis(client, store.RedisOptions{})
			for name, call := range storeCalls() {
				ctx, cancel := context.WithTimeout(t.Context(), tc.ctxTimeout)
				start := time.Now()
				err := call(ctx, st)
				cancel()
				if !errors.Is(err, store.ErrUnavailable) {
					t.Errorf("%s: error %v, want store.ErrUnavailable", name, err)
				}
				if took := time.Since(start); took > tc.within {
					t.Errorf("%s took %s, want at most %s", name, took, tc.within)
				}
			}
		})
	}
}

// storeCalls calls each Store method with valid arguments.
func storeCalls() map[string]func(context.Context, store.Store) error {
	const tenant, id = "tenant-a", "cred-1"
	var hash [32]byte
	return map[string]func(context.Context, store.Store) error{
		"PutCredential": func(ctx context.Context, st store.Store) error {
			_, err := st.PutCredential(ctx, store.Credential{TenantID: tenant, CredentialID: id}, store.PutOptions{})
			return err
		},
		"PutCredentials": func(ctx context.Context, st store.Store) error {
			return st.PutCredentials(ctx, []store.PutItem{{Credential: store.Credential{TenantID: tenant, CredentialID: id}}})[0].Err
		},
		"GetCredential": func(ctx context.Context, st store.Store) error {
			_, err := st.GetCredential(ctx, tenant, id)
			return err
		},
		"ListCredentials": func(ctx context.Context, st store.Store) error {
			_, _, err := st.ListCredentials(ctx, tenant, 10, "")
			return err
		},
		"DeleteCredential": func(ctx context.Context, st store.Store) error {
			_, err := st.DeleteCredential(ctx, tenant, id, store.Request{})
			return err
		},
		"SetValidation": func(ctx context.Context, st store.Store) error {
			_, err := st.SetValidation(ctx, tenant, id, 1, store.Validation{})
			return err
		},
		"UpdateCiphertext": func(ctx context.Context, st store.Store) error {
			return st.UpdateCiphertext(ctx, tenant, id, 1, "c", 2)
		},
		"ForEachCredential": func(ctx context.Context, st store.Store) error {
			return st.ForEachCredential(ctx, func(store.Credential) error { return nil })
		},
		"CreateSession": func(ctx context.Context, st store.Store) error {
			_, err := st.CreateSession(ctx, store.Session{TenantID: tenant, CredentialID: id, ExpireTime: time.Now().Add(time.Minute)}, store.Request{})
			return err
		},
		"GetSession": func(ctx context.Context, st store.Store) error {
			_, err := st.GetSession(ctx, hash)
			return err
		},
		"GetSessionCredential": func(ctx context.Context, st store.Store) error {
			_, _, err := st.GetSessionCredential(ctx, hash)
			return err
		},
		"DeleteSession": func(ctx context.Context, st store.Store) error {
			_, err := st.DeleteSession(ctx, hash)
			return err
		},
	}
}

func TestNewRedisRejectsBracesInPrefix(t *testing.T) {
	for _, prefix := range []string{"fb{", "}fb", "a{b}c"} {
		t.Run(prefix, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Errorf("NewRedis(prefix %q) did not panic", prefix)
				}
			}()
			store.NewRedis(redis.NewClient(&redis.Options{Addr: closedAddr(t)}), store.RedisOptions{Prefix: prefix})
		})
	}
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// silentAddr returns the address of a server that accepts connections,
// reads whatever is sent and never answers.
func silentAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_, _ = io.Copy(io.Discard, conn)
			}()
		}
	}()
	return l.Addr().String()
}

// monitor starts MONITOR on a raw connection (go-redis's MonitorCmd polls
// and races) and streams its lines until the test ends.
func monitor(t *testing.T, addr string) <-chan string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	r := bufio.NewReader(conn)
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := r.ReadString('\n'); err != nil || strings.TrimSpace(line) != "+OK" {
		t.Fatalf("MONITOR: %q, %v", line, err)
	}
	lines := make(chan string, 1024)
	go func() {
		defer close(lines)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			lines <- strings.TrimSuffix(line, "\r\n")
		}
	}()
	return lines
}

type monitoredCommand struct {
	source string // the client's address, or "lua" inside a script
	args   []string
}

var (
	// +1700000000.123456 [0 127.0.0.1:5678] "EVALSHA" "..." ...
	monitorLine = regexp.MustCompile(`^\+\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$`)
	monitorArg  = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
)

// commandsUntil yields the monitored commands up to the one naming the
// marker key.
func commandsUntil(t *testing.T, lines <-chan string, marker string) func(func(monitoredCommand) bool) {
	return func(yield func(monitoredCommand) bool) {
		timeout := time.After(10 * time.Second)
		for {
			var line string
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatal("MONITOR connection closed early")
				}
				line = l
			case <-timeout:
				t.Fatal("MONITOR never showed the marker command")
			}
			cmd, ok := parseMonitorLine(t, line)
			if !ok {
				continue
			}
			if strings.Contains(line, marker) {
				return
			}
			if !yield(cmd) {
				return
			}
		}
	}
}

func parseMonitorLine(t *testing.T, line string) (monitoredCommand, bool) {
	m := monitorLine.FindStringSubmatch(line)
	if m == nil {
		return monitoredCommand{}, false
	}
	cmd := monitoredCommand{source: m[1]}
	for _, q := range monitorArg.FindAllString(m[2], -1) {
		a, err := strconv.Unquote(q)
		if err != nil {
			t.Fatalf("cannot unquote %s in %q: %v", q, line, err)
		}
		cmd.args = append(cmd.args, a)
	}
	return cmd, len(cmd.args) > 0
}

// scriptKeys returns the KEYS of an EVAL/EVALSHA command line.
func scriptKeys(t *testing.T, args []string) []string {
	t.Helper()
	if len(args) < 3 {
		t.Fatalf("short script call %q", args)
	}
	n, err := strconv.Atoi(args[2])
	if err != nil || 3+n > len(args) {
		t.Fatalf("bad numkeys in %q", args)
	}
	return args[3 : 3+n]
}

// keySlot is Redis Cluster's HASH_SLOT: CRC16 of the hash tag (the text
// between the first '{' and the next '}', if not empty) or of the whole key.
func keySlot(key string) int {
	if open := strings.IndexByte(key, '{'); open >= 0 {
		if end := strings.IndexByte(key[open+1:], '}'); end > 0 {
			key = key[open+1 : open+1+end]
		}
	}
	return int(crc16([]byte(key)) % 16384)
}

// crc16 is CRC-16/XMODEM (polynomial 0x1021, initial value 0), the variant
// Redis Cluster uses.
func crc16(b []byte) uint16 {
	var crc uint16
	for _, c := range b {
		crc ^= uint16(c) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}
