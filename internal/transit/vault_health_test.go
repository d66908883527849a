package transit_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

func TestVaultHealthAndOnCall(t *testing.T) {
	srv := testenv.Vault(t)
	var mu sync.Mutex
	calls := map[string]int{}
	var failed int
	key := srv.NewKeyName(t)
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key, OnCall: func(op string, took time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		calls[op]++
		if err != nil {
			failed++
		}
	}}, nil)
	if err := v.EnsureKey(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := v.Health(context.Background()); err != nil {
		t.Fatalf("healthy Vault reported unhealthy: %v", err)
	}
	if _, err := v.Encrypt(context.Background(), "acme", []transit.Item{{Plaintext: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	_, err := v.Decrypt(context.Background(), "other-tenant", []transit.Item{{Ciphertext: "vault:v1:AAAA"}})
	if !errors.Is(err, transit.ErrDecrypt) {
		t.Fatalf("bad decrypt: %v", err)
	}
	mu.Lock()
	if calls["encrypt"] == 0 || calls["decrypt"] == 0 || failed == 0 {
		t.Errorf("OnCall saw %v with %d failures; want encrypt, decrypt and a failure", calls, failed)
	}
	mu.Unlock()

	// A sealed Vault is unhealthy: a fake that answers the token lookup
	// NewVault makes, then reports itself sealed.
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/auth/token/lookup-self":
			_, _ = w.Write([]byte(`{"data":{"renewable":false,"ttl":0}}`))
		case "/v1/sys/health":
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(`{"initialized":true,"sealed":true}`))
		default:
			http.NotFound(w, r)
		}
	}))
	defer fake.Close()
	sealed := newVault(t, transit.VaultConfig{Addr: fake.URL, Token: "t", Key: key, Timeout: time.Second}, nil)
	if err := sealed.Health(context.Background()); !errors.Is(err, transit.ErrUnavailable) {
		t.Fatalf("sealed Vault: %v, want ErrUnavailable", err)
	}
	fake.Close()
	if err := sealed.Health(context.Background()); !errors.Is(err, transit.ErrUnavailable) {
		t.Fatalf("unreachable Vault: %v, want ErrUnavailable", err)
	}
}
