package transit_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/internal/transit/transittest"
)

func TestMain(m *testing.M) { testenv.Main(m) }

const secretText = "CANARY-vault-test-secret-72-chars-0123456789abcdef0123456789abcdef012345"

// newVault connects as cfg says, closing the client when the test ends. A
// nil logger discards logs.
func newVault(t *testing.T, cfg transit.VaultConfig, logger *slog.Logger) *transit.Vault {
	t.Helper()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	v, err := transit.NewVault(t.Context(), cfg, logger)
	if err != nil {
		t.Fatalf("NewVault: %v", err)
	}
	t.Cleanup(func() { _ = v.Close() })
	return v
}

// newKeyedVault returns a root-token client for a new, existing key.
func newKeyedVault(t *testing.T, srv testenv.VaultServer) (*transit.Vault, string) {
	t.Helper()
	key := srv.NewKeyName(t)
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, nil)
	if err := v.EnsureKey(t.Context()); err != nil {
		t.Fatalf("EnsureKey: %v", err)
	}
	return v, key
}

// rootClient is a plain Vault API client, for setting up and for checking
// what the server really stored.
func rootClient(t *testing.T, srv testenv.VaultServer) *api.Client {
	t.Helper()
	conf := api.DefaultConfig()
	conf.Address = srv.Addr
	if srv.CACert != "" {
		if err := conf.ConfigureTLS(&api.TLSConfig{CACert: srv.CACert}); err != nil {
			t.Fatalf("vault CA: %v", err)
		}
	}
	c, err := api.NewClient(conf)
	if err != nil {
		t.Fatalf("api.NewClient: %v", err)
	}
	c.SetToken(srv.RootToken)
	return c
}

// createToken makes a child token with the given policies and ttl.
func createToken(t *testing.T, root *api.Client, ttl string, policies ...string) string {
	t.Helper()
	s, err := root.Auth().Token().CreateWithContext(t.Context(), &api.TokenCreateRequest{
		Policies:  policies,
		TTL:       ttl,
		Renewable: new(true),
	})
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	return s.Auth.ClientToken
}

func TestVaultConformance(t *testing.T) {
	srv := testenv.Vault(t)
	transittest.Run(t, func(t *testing.T) transit.Rotatable {
		v, _ := newKeyedVault(t, srv)
		return v
	})
}

// The ciphertexts are plain Vault transit ciphertexts: another Vault client
// decrypts them with context = tenant and the same associated_data, and
// without the associated_data Vault refuses. This checks that the AAD is
// really bound server-side, not just carried along.
func TestVaultCiphertextInterop(t *testing.T) {
	srv := testenv.Vault(t)
	v, key := newKeyedVault(t, srv)
	aad := []byte("tenant-a/cred-1")
	cts, err := v.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte(secretText), AssociatedData: aad}})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if !strings.HasPrefix(cts[0], "vault:v1:") {
		t.Fatalf("ciphertext %q does not start with vault:v1:", cts[0])
	}

	root := rootClient(t, srv)
	decrypt := func(withAAD bool) (*api.Secret, error) {
		body := map[string]any{"ciphertext": cts[0], "context": b64("tenant-a")}
		if withAAD {
			body["associated_data"] = base64.StdEncoding.EncodeToString(aad)
		}
		return root.Logical().WriteWithContext(t.Context(), "transit/decrypt/"+key, body)
	}
	s, err := decrypt(true)
	if err != nil {
		t.Fatalf("raw decrypt: %v", err)
	}
	if got, _ := base64.StdEncoding.DecodeString(s.Data["plaintext"].(string)); string(got) != secretText {
		t.Errorf("raw decrypt = %q, want the secret", got)
	}
	if _, err := decrypt(false); err == nil {
		t.Error("raw decrypt without associated_data succeeded; the AAD is not bound")
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestVaultEnsureKey(t *testing.T) {
	srv := testenv.Vault(t)
	root := rootClient(t, srv)

	t.Run("creates a derived AES-GCM key once", func(t *testing.T) {
		key := srv.NewKeyName(t)
		v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, nil)
		for range 2 { // idempotent
			if err := v.EnsureKey(t.Context()); err != nil {
				t.Fatalf("EnsureKey: %v", err)
			}
		}
		s, err := root.Logical().ReadWithContext(t.Context(), "transit/keys/"+key)
		if err != nil || s == nil {
			t.Fatalf("read key: %v", err)
		}
		if s.Data["type"] != "aes256-gcm96" || s.Data["derived"] != true {
			t.Errorf("key type=%v derived=%v, want aes256-gcm96 derived", s.Data["type"], s.Data["derived"])
		}
	})

	t.Run("refuses an existing non-derived key", func(t *testing.T) {
		key := srv.NewKeyName(t)
		if _, err := root.Logical().WriteWithContext(t.Context(), "transit/keys/"+key, map[string]any{"type": "aes256-gcm96"}); err != nil {
			t.Fatalf("create key: %v", err)
		}
		v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, nil)
		if err := v.EnsureKey(t.Context()); !errors.Is(err, transit.ErrInvalid) {
			t.Errorf("EnsureKey = %v, want ErrInvalid", err)
		}
	})
}

// A missing key, or a transit engine missing at the mount, is ErrKeyMissing
// — for every operation, whether the token is root or, like the services',
// may only update (where Vault answers an encrypt under a missing key with
// 403, as if creating it) — and never ErrDecrypt, which would read as a bad
// ciphertext. A token that may not use an existing key stays ErrInvalid.
func TestVaultMissingKey(t *testing.T) {
	srv := testenv.Vault(t)
	root := rootClient(t, srv)
	key := srv.NewKeyName(t)
	policy := "missing-" + key
	rules := fmt.Sprintf(`path "transit/encrypt/%[1]s" { capabilities = ["update"] }
path "transit/decrypt/%[1]s" { capabilities = ["update"] }
path "transit/datakey/wrapped/%[1]s" { capabilities = ["update"] }
path "transit/hmac/%[1]s/*" { capabilities = ["update"] }
path "nomount-%[1]s/*" { capabilities = ["update"] }`, key)
	if err := root.Sys().PutPolicyWithContext(t.Context(), policy, rules); err != nil {
		t.Fatal(err)
	}
	leastPrivilege := createToken(t, root, "1h", "default", policy)
	ct := "vault:v1:" + b64(strings.Repeat("x", 40))
	calls := []struct {
		name string
		call func(ctx context.Context, v *transit.Vault) error
	}{
		{"Encrypt", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.Encrypt(ctx, "tenant-a", []transit.Item{{Plaintext: []byte(secretText)}})
			return err
		}},
		{"Decrypt", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.Decrypt(ctx, "tenant-a", []transit.Item{{Ciphertext: ct}})
			return err
		}},
		{"Rewrap", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.Rewrap(ctx, "tenant-a", []transit.Item{{Ciphertext: ct}})
			return err
		}},
		{"GenerateDataKey", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.GenerateDataKey(ctx, "tenant-a")
			return err
		}},
		{"UnwrapDataKey", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.UnwrapDataKey(ctx, "tenant-a", ct)
			return err
		}},
		{"HMAC", func(ctx context.Context, v *transit.Vault) error {
			_, err := v.HMAC(ctx, []byte(secretText))
			return err
		}},
		{"ProbeEncrypt", func(ctx context.Context, v *transit.Vault) error { return transit.ProbeEncrypt(ctx, v) }},
		{"ProbeDataKey", func(ctx context.Context, v *transit.Vault) error { return transit.ProbeDataKey(ctx, v) }},
	}
	setups := []struct {
		name  string
		cfg   transit.VaultConfig
		skips string // a call the setup cannot make without creating the key
	}{
		// A root token's encrypt would create the key (the dev server
		// allows upsert), so it is left out.
		{"root token, missing key", transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, "Encrypt ProbeEncrypt"},
		{"least privilege, missing key", transit.VaultConfig{Addr: srv.Addr, Token: leastPrivilege, Key: key}, ""},
		{"least privilege, missing mount", transit.VaultConfig{Addr: srv.Addr, Token: leastPrivilege, Key: key, Mount: "nomount-" + key}, ""},
	}
	for _, setup := range setups {
		t.Run(setup.name, func(t *testing.T) {
			v := newVault(t, setup.cfg, nil)
			for _, tc := range calls {
				if strings.Contains(setup.skips, tc.name) {
					continue
				}
				t.Run(tc.name, func(t *testing.T) {
					err := tc.call(t.Context(), v)
					if !errors.Is(err, transit.ErrKeyMissing) || errors.Is(err, transit.ErrDecrypt) {
						t.Errorf("error = %v, want ErrKeyMissing", err)
					}
					if err != nil {
						assertNoLeak(t, err.Error(), leastPrivilege, secretText)
					}
				})
			}
		})
	}
	// The key exists now: the least-privilege token uses it, and the
	// probes pass.
	if err := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: srv.RootToken, Key: key}, nil).EnsureKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: leastPrivilege, Key: key}, nil)
	for _, probe := range []func(context.Context, transit.Transit) error{transit.ProbeEncrypt, transit.ProbeDataKey} {
		if err := probe(t.Context(), v); err != nil {
			t.Errorf("probe of an existing key: %v", err)
		}
	}
}

func TestVaultConfigRequired(t *testing.T) {
	for _, cfg := range []transit.VaultConfig{{Token: "t"}, {Addr: "http://127.0.0.1:1"}} {
		if _, err := transit.NewVault(t.Context(), cfg, nil); !errors.Is(err, transit.ErrInvalid) {
			t.Errorf("NewVault(%+v) = %v, want ErrInvalid", cfg, err)
		}
	}
}

// assertNoLeak fails if text contains any of the secrets, raw or base64.
func assertNoLeak(t *testing.T, text string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if strings.Contains(text, s) || strings.Contains(text, b64(s)) {
			t.Errorf("text %q leaks a secret", text)
		}
	}
}

func TestVaultPermissionDenied(t *testing.T) {
	srv := testenv.Vault(t)
	rootVault, key := newKeyedVault(t, srv)
	aad := []byte("tenant-a/cred-1")
	cts, err := rootVault.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte(secretText), AssociatedData: aad}})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	// The default policy allows token lookup-self and renew-self, nothing
	// on transit.
	token := createToken(t, rootClient(t, srv), "1h", "default")
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: token, Key: key}, nil)

	items := []transit.Item{{Plaintext: []byte(secretText), Ciphertext: cts[0], AssociatedData: aad}}
	tests := []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"Encrypt", func(ctx context.Context) error { _, err := v.Encrypt(ctx, "tenant-a", items); return err }},
		{"Decrypt", func(ctx context.Context) error { _, err := v.Decrypt(ctx, "tenant-a", items); return err }},
		{"Rewrap", func(ctx context.Context) error { _, err := v.Rewrap(ctx, "tenant-a", items); return err }},
		{"GenerateDataKey", func(ctx context.Context) error { _, err := v.GenerateDataKey(ctx, "tenant-a"); return err }},
		{"UnwrapDataKey", func(ctx context.Context) error { _, err := v.UnwrapDataKey(ctx, "tenant-a", cts[0]); return err }},
		{"HMAC", func(ctx context.Context) error { _, err := v.HMAC(ctx, []byte(secretText)); return err }},
		{"RotateKey", func(ctx context.Context) error { return v.RotateKey(ctx) }},
		{"EnsureKey", func(ctx context.Context) error { return v.EnsureKey(ctx) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(t.Context())
			if !errors.Is(err, transit.ErrInvalid) {
				t.Fatalf("error = %v, want ErrInvalid", err)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), "status 403") {
				t.Errorf("error %q does not name the status", err)
			}
			assertNoLeak(t, err.Error(), token, secretText, cts[0], strings.TrimPrefix(cts[0], "vault:v1:"))
		})
	}

	t.Run("bad token fails NewVault", func(t *testing.T) {
		bad := "hvs.not-a-real-token-" + key
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Token: bad, Key: key}, nil)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("NewVault = %v, want ErrInvalid", err)
		}
		assertNoLeak(t, err.Error(), bad)
	})
}

// syncBuffer is a bytes.Buffer safe for the watcher goroutine's logging.
type syncBuffer = testenv.LogBuffer

// A renewable token with a 3s TTL still works after 4.5s because the
// watcher renews it; an identical token nobody renews has expired by then,
// which shows the TTL really is that short.
func TestVaultTokenRenewal(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	policy := "renewal-" + key
	rules := fmt.Sprintf("path \"transit/encrypt/%s\" { capabilities = [\"update\"] }\n", key)
	if err := root.Sys().PutPolicyWithContext(t.Context(), policy, rules); err != nil {
		t.Fatalf("put policy: %v", err)
	}
	renewed := createToken(t, root, "3s", "default", policy)
	control := createToken(t, root, "3s", "default", policy)

	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: renewed, Key: key}, logger)

	select {
	case <-time.After(4500 * time.Millisecond):
	case <-t.Context().Done():
		t.Fatal("test cancelled")
	}

	if _, err := v.Encrypt(t.Context(), "tenant-a", []transit.Item{{Plaintext: []byte("x")}}); err != nil {
		t.Errorf("Encrypt with the renewed token: %v", err)
	}
	controlClient := rootClient(t, srv)
	controlClient.SetToken(control)
	if _, err := controlClient.Auth().Token().LookupSelfWithContext(t.Context()); err == nil {
		t.Error("the unrenewed control token still works; the test would pass without renewal")
	}
	t.Logf("watcher logs:\n%s", logs.String())
	if !strings.Contains(logs.String(), "vault token renewed") {
		t.Errorf("no renewal logged; logs:\n%s", logs.String())
	}
	if err := v.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	assertNoLeak(t, logs.String(), renewed)
}

// fakeVault answers lookup-self like Vault and every other request with
// status and a body that echoes the request, as Vault's own error messages
// sometimes do, so the test can check that nothing of it reaches the error.
func fakeVault(t *testing.T, status int, contentType string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/auth/token/lookup-self" {
			fmt.Fprint(w, `{"data":{"renewable":false,"ttl":0}}`)
			return
		}
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(status)
		if contentType == "application/json" {
			fmt.Fprintf(w, `{"errors":[%q]}`, body)
		} else {
			fmt.Fprintf(w, "<html>%s</html>", body)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestVaultUnavailable(t *testing.T) {
	const timeout = 2 * time.Second
	items := []transit.Item{{Plaintext: []byte(secretText), AssociatedData: []byte("tenant-a/cred-1")}}

	t.Run("no server at NewVault", func(t *testing.T) {
		start := time.Now()
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: "http://" + closedAddr(t), Token: "t", Timeout: timeout}, nil)
		checkUnavailable(t, err, start, timeout)
	})

	t.Run("server never answers", func(t *testing.T) {
		start := time.Now()
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: "http://" + silentAddr(t), Token: "t", Timeout: 500 * time.Millisecond}, nil)
		checkUnavailable(t, err, start, 500*time.Millisecond)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("error %v does not say the deadline passed", err)
		}
	})

	t.Run("server goes away", func(t *testing.T) {
		vs := testenv.Vault(t)
		_, key := newKeyedVault(t, vs)
		target, _ := url.Parse(vs.Addr)
		proxy := httptest.NewServer(httputil.NewSingleHostReverseProxy(target))
		v := newVault(t, transit.VaultConfig{Addr: proxy.URL, Token: vs.RootToken, Key: key, Timeout: timeout}, nil)
		if _, err := v.Encrypt(t.Context(), "tenant-a", items); err != nil {
			t.Fatalf("Encrypt through the proxy: %v", err)
		}
		proxy.Close()
		start := time.Now()
		_, err := v.Encrypt(t.Context(), "tenant-a", items)
		checkUnavailable(t, err, start, timeout)
	})

	for _, tc := range []struct {
		name        string
		status      int
		contentType string
	}{
		{"sealed", http.StatusServiceUnavailable, "application/json"},
		{"internal error", http.StatusInternalServerError, "application/json"},
		{"rate limited", http.StatusTooManyRequests, "application/json"},
		{"proxy answers html", http.StatusOK, "text/html"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := fakeVault(t, tc.status, tc.contentType)
			v := newVault(t, transit.VaultConfig{Addr: fake.URL, Token: "t", Timeout: timeout}, nil)
			start := time.Now()
			_, err := v.Encrypt(t.Context(), "tenant-a", items)
			checkUnavailable(t, err, start, timeout)
			assertNoLeak(t, err.Error(), secretText)
		})
	}

	t.Run("refusal echoing input", func(t *testing.T) {
		fake := fakeVault(t, http.StatusBadRequest, "application/json")
		v := newVault(t, transit.VaultConfig{Addr: fake.URL, Token: "t", Timeout: timeout}, nil)
		_, err := v.Encrypt(t.Context(), "tenant-a", items)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("error = %v, want ErrInvalid", err)
		}
		assertNoLeak(t, err.Error(), secretText)
	})
}

func checkUnavailable(t *testing.T, err error, start time.Time, timeout time.Duration) {
	t.Helper()
	elapsed := time.Since(start)
	if !errors.Is(err, transit.ErrUnavailable) {
		t.Fatalf("error = %v, want ErrUnavailable", err)
	}
	t.Logf("after %s: %v", elapsed.Round(time.Millisecond), err)
	if elapsed > timeout+500*time.Millisecond {
		t.Errorf("took %s, timeout is %s", elapsed, timeout)
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
	l.Close()
	return addr
}

// silentAddr returns a loopback address that accepts connections and
// never answers.
func silentAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}
