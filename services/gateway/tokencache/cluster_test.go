package tokencache

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// TestTenantsSpreadOverClusterMasters mints, reads and invalidates tokens
// for several tenants on the three-master cluster. The tenants' slots lie
// on different masters, so the MGET of token and lock, the lock scripts and
// the data-key writes would fail with CROSSSLOT, and the test with them, if
// any of their keys strayed from the tenant's slot.
func TestTenantsSpreadOverClusterMasters(t *testing.T) {
	b := realBackend(t, testenv.RedisShardedCluster(t))
	cache := replicas(t, b, newTransit(t), 1, Options{})[0]
	client, ok := cache.client.(*redis.ClusterClient)
	if !ok {
		t.Fatalf("the sharded cluster's client is a %T, want *redis.ClusterClient", cache.client)
	}
	ctx := t.Context()
	tenants := map[string]bool{}
	for i := range 12 {
		tenant := fmt.Sprintf("tenant-%02d", i)
		tenants[tenant] = true
		m := newMinter(tenant)
		for _, cred := range []string{"c1", "c2"} {
			e, err := cache.GetOrMint(ctx, testKey(tenant, cred), m.mint)
			if err != nil {
				t.Fatalf("GetOrMint(%s/%s): %v", tenant, cred, err)
			}
			if cred == "c2" {
				if err := cache.Invalidate(ctx, e); err != nil {
					t.Fatalf("Invalidate(%s/%s): %v", tenant, cred, err)
				}
			}
		}
		// A hit reads the stored token back through the tenant's data key.
		if e, err := cache.GetOrMint(ctx, testKey(tenant, "c1"), m.mint); err != nil || e.Token() != tenant+"-1" {
			t.Fatalf("GetOrMint(%s/c1) again = %q, %v; want %s-1", tenant, e.Token(), err, tenant)
		}
	}

	// Which master holds each tenant's keys: all in the tenant's slot.
	var mu sync.Mutex
	masterOf := map[string]map[string]bool{} // tenant -> master addresses
	err := client.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
		iter := node.Scan(ctx, 0, b.prefix+":*", 1000).Iterator()
		for iter.Next(ctx) {
			rest, ok := strings.CutPrefix(iter.Val(), b.prefix+":{")
			tenant, _, found := strings.Cut(rest, "}")
			if !ok || !found {
				return fmt.Errorf("key %q has no tenant hash tag", iter.Val())
			}
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
