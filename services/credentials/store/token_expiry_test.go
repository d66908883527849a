package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// TestTokenExpireTime: a credential's token expiry round-trips exactly,
// survives a validation (which describes the secret, not replaces it), and
// is replaced with the secret: a Put without one clears it.
func TestTokenExpireTime(t *testing.T) {
	for name, open := range map[string]func(t *testing.T) *store.Redis{
		"redis": func(t *testing.T) *store.Redis {
			return store.NewRedis(testenv.Redis(t).Client(t), store.RedisOptions{Prefix: testenv.RedisPrefix(t)})
		},
		"miniredis": func(t *testing.T) *store.Redis {
			m := miniredis.RunT(t)
			c := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
			t.Cleanup(func() { _ = c.Close() })
			return store.NewRedis(c, store.RedisOptions{})
		},
	} {
		t.Run(name, func(t *testing.T) {
			st := open(t)
			ctx := context.Background()
			expire := time.Date(2027, 3, 4, 5, 6, 7, 891011121, time.FixedZone("x", 3600))
			rec := store.Credential{TenantID: "acme", CredentialID: "w", Provider: store.ProviderWialon, Ciphertext: "vault:v1:x",
				ValidationState: store.ValidationValid, TokenExpireTime: expire}
			if _, err := st.PutCredential(ctx, rec, store.PutOptions{}); err != nil {
				t.Fatal(err)
			}
			got, err := st.GetCredential(ctx, "acme", "w")
			if err != nil {
				t.Fatal(err)
			}
			if !got.TokenExpireTime.Equal(expire) {
				t.Fatalf("TokenExpireTime = %v, want %v", got.TokenExpireTime, expire)
			}
			validated, err := st.SetValidation(ctx, "acme", "w", got.Version, store.Validation{State: store.ValidationRejected, Time: time.Now()})
			if err != nil {
				t.Fatal(err)
			}
			if !validated.TokenExpireTime.Equal(expire) {
				t.Errorf("after SetValidation TokenExpireTime = %v, want %v kept", validated.TokenExpireTime, expire)
			}
			var seen time.Time
			if err := st.ForEachCredential(ctx, func(c store.Credential) error {
				if c.TenantID == "acme" && c.CredentialID == "w" {
					seen = c.TokenExpireTime
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if !seen.Equal(expire) {
				t.Errorf("ForEachCredential TokenExpireTime = %v, want %v", seen, expire)
			}
			rec.TokenExpireTime = time.Time{}
			replaced, err := st.PutCredential(ctx, rec, store.PutOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !replaced.Credential.TokenExpireTime.IsZero() {
				t.Errorf("a Put without expiry left TokenExpireTime = %v", replaced.Credential.TokenExpireTime)
			}
		})
	}
}
