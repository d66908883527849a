package testenv_test

import (
	"os"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// A crashed master is replaced by one of its replicas, which keeps what
// was written before and takes writes through a Sentinel-backed client.
func TestRedisSentinelFailover(t *testing.T) {
	d := testenv.RedisSentinelFailover(t)
	if len(d.Nodes) != 3 || len(d.Addrs) != 3 {
		t.Fatalf("deployment %+v, want a master, two replicas and three Sentinels", d.RedisDeployment)
	}
	client := d.Client(t)
	ctx := t.Context()
	if err := client.Set(ctx, "before", "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	// WAIT: the write is on a replica before the master dies.
	if n, err := client.Do(ctx, "WAIT", 2, 5000).Int(); err != nil || n != 2 {
		t.Fatalf("WAIT 2 = %d, %v", n, err)
	}
	old := d.KillMaster(t)
	if old != d.Nodes[0] {
		t.Errorf("killed %s, want the first master %s", old, d.Nodes[0])
	}
	promoted, _ := d.WaitFailover(t, old, 60*time.Second)
	if !slices.Contains(d.Nodes[1:], promoted) {
		t.Fatalf("promoted %s, want one of the replicas %v", promoted, d.Nodes[1:])
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := client.Set(ctx, "after", "2", 0).Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no write through the Sentinels after the failover: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	direct := redis.NewClient(&redis.Options{Addr: promoted})
	t.Cleanup(func() { _ = direct.Close() })
	for _, key := range []string{"before", "after"} {
		if err := direct.Get(ctx, key).Err(); err != nil {
			t.Errorf("GET %s on the promoted master: %v", key, err)
		}
	}
}

func TestReadProcStats(t *testing.T) {
	st, err := testenv.ReadProcStats(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.RSS < 1<<20 || st.FDs < 3 || st.Threads < 1 {
		t.Errorf("stats of this process %+v: want RSS ≥ 1 MiB, ≥ 3 open descriptors, a thread", st)
	}
}
