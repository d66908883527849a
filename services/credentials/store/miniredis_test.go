package store_test

import (
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
	"github.com/fleetbroker/fleetbroker/services/credentials/store/storetest"
)

// TestMiniredisConformance holds the store to the suite on miniredis, the
// in-process server `fleetbroker dev` runs on. Each test gets its own
// server, so Advance can fast-forward its clock without touching others.
func TestMiniredisConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		m := miniredis.RunT(t)
		client := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = client.Close() })
		return storetest.Harness{
			Store:   store.NewRedis(client, store.RedisOptions{}),
			Advance: m.FastForward,
		}
	})
}
