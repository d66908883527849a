package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// TestVaultInitScript runs deploy/vault/init.sh (what docker-compose's
// vault-init runs) against a real Vault with the real vault CLI, and checks
// the transit setup it promises: both keys derived, implicit key creation
// off, both service policies written. Running it twice must succeed too.
func TestVaultInitScript(t *testing.T) {
	vs := testenv.Vault(t)
	bin := testenv.VaultBinary(t)
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		cmd := exec.CommandContext(ctx, "sh", "../../deploy/vault/init.sh")
		cmd.Env = append(os.Environ(), "VAULT_ADDR="+vs.Addr, "VAULT_TOKEN="+vs.RootToken, "POLICY_DIR=../../deploy/vault",
			"PATH="+filepath.Dir(bin)+string(os.PathListSeparator)+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("init.sh: %v\n%s", err, out)
		}
	}
	conf := api.DefaultConfig()
	conf.Address = vs.Addr
	client, err := api.NewClient(conf)
	if err != nil {
		t.Fatal(err)
	}
	client.SetToken(vs.RootToken)
	for _, key := range []string{"fleetbroker", "fleetbroker-gateway"} {
		s, err := client.Logical().Read("transit/keys/" + key)
		if err != nil || s == nil || s.Data["derived"] != true {
			t.Fatalf("transit key %s not derived: %v %v", key, s, err)
		}
	}
	cfg, err := client.Logical().Read("transit/config/keys")
	if err != nil || cfg == nil || cfg.Data["disable_upsert"] != true {
		t.Fatalf("disable_upsert not set: %v %v", cfg, err)
	}
	for _, policy := range []string{"fleetbroker-credentials", "fleetbroker-gateway"} {
		if rules, err := client.Sys().GetPolicy(policy); err != nil || rules == "" {
			t.Fatalf("policy %s not written: %v", policy, err)
		}
	}
	// With upsert off, encrypting under a key nobody created fails.
	if _, err := client.Logical().Write("transit/encrypt/not-created", map[string]any{"plaintext": "eA==", "context": "eA=="}); err == nil {
		t.Fatal("encrypt created a key despite disable_upsert")
	}
}

// TestVaultInitScriptPersistent runs deploy/vault/init.sh the way
// docker-compose's vault-init does, against a real `vault server` on file
// storage: it initializes and unseals Vault, keeps the unseal key and root
// token (0600, never printed), sets up transit and the policies, and makes
// each service's token. After a restart Vault comes back sealed with its
// keys and tokens; the script unseals it without initializing it again, so
// what was encrypted before still decrypts — once when run again, and by
// itself in watch mode.
func TestVaultInitScriptPersistent(t *testing.T) {
	vs := testenv.VaultFile(t)
	bin := testenv.VaultBinary(t)
	dir := t.TempDir()
	initDir := filepath.Join(dir, "init")
	const credTokenID, gwTokenID = "test-credentials-token", "test-gateway-token"
	env := append(os.Environ(), "VAULT_ADDR="+vs.Addr, "VAULT_INIT_DIR="+initDir, "POLICY_DIR=../../deploy/vault",
		"CREDENTIALS_TOKEN_ID="+credTokenID, "GATEWAY_TOKEN_ID="+gwTokenID, "VAULT_READY_FILE="+filepath.Join(dir, "ready"),
		"PATH="+filepath.Dir(bin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	env = slices.DeleteFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "VAULT_TOKEN=") })
	runInit := func(t *testing.T) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "sh", "../../deploy/vault/init.sh")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("init.sh: %v\n%s", err, out)
		}
		return string(out)
	}
	secrets := func(t *testing.T) (unsealKey, rootToken string) {
		t.Helper()
		for name, v := range map[string]*string{"unseal-key": &unsealKey, "root-token": &rootToken} {
			path := filepath.Join(initDir, name)
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %v, want 0600", name, fi.Mode().Perm())
			}
			b, err := os.ReadFile(path)
			if err != nil || len(strings.TrimSpace(string(b))) == 0 {
				t.Fatalf("%s is empty: %v", name, err)
			}
			*v = strings.TrimSpace(string(b))
		}
		return unsealKey, rootToken
	}
	noSecrets := func(t *testing.T, out string, secrets ...string) {
		t.Helper()
		for _, s := range append(secrets, credTokenID, gwTokenID) {
			if strings.Contains(out, s) {
				t.Errorf("init.sh printed a secret:\n%s", out)
			}
		}
	}

	out := runInit(t)
	unsealKey, rootToken := secrets(t)
	noSecrets(t, out, unsealKey, rootToken)
	if vs.Sealed(t) {
		t.Fatal("Vault is still sealed after init.sh")
	}
	// The services' tokens work with their keys, and only those.
	ctx := context.Background()
	creds := newTransit(t, vs.Addr, credTokenID, "fleetbroker")
	aad := []byte("acme/c1")
	ct, err := creds.Encrypt(ctx, "acme", []transit.Item{{AssociatedData: aad, Plaintext: []byte("before the restart")}})
	if err != nil {
		t.Fatalf("the credentials token cannot encrypt: %v", err)
	}
	gw := newTransit(t, vs.Addr, gwTokenID, "fleetbroker-gateway")
	if err := transit.ProbeDataKey(ctx, gw); err != nil {
		t.Fatalf("the gateway token cannot make data keys: %v", err)
	}
	if _, err := newTransit(t, vs.Addr, gwTokenID, "fleetbroker").Decrypt(ctx, "acme", []transit.Item{{AssociatedData: aad, Ciphertext: ct[0]}}); !errors.Is(err, transit.ErrInvalid) {
		t.Fatalf("the gateway token decrypting a customer secret: %v, want ErrInvalid (denied)", err)
	}
	decrypts := func(t *testing.T) {
		t.Helper()
		c := newTransit(t, vs.Addr, credTokenID, "fleetbroker")
		pt, err := c.Decrypt(ctx, "acme", []transit.Item{{AssociatedData: aad, Ciphertext: ct[0]}})
		if err != nil || string(pt[0]) != "before the restart" {
			t.Fatalf("after the restart, the ciphertext made before: %q, %v", pt, err)
		}
	}

	t.Run("run again after a restart", func(t *testing.T) {
		vs.Restart(t)
		if !vs.Sealed(t) {
			t.Fatal("a restarted Vault on file storage should come back sealed")
		}
		out := runInit(t)
		noSecrets(t, out, unsealKey, rootToken)
		if strings.Contains(out, "initialized Vault") {
			t.Errorf("init.sh initialized Vault again:\n%s", out)
		}
		if k, r := secrets(t); k != unsealKey || r != rootToken {
			t.Error("init.sh replaced the kept unseal key or root token")
		}
		vs.WaitActive(t)
		decrypts(t)
	})

	t.Run("watch mode unseals a restarted Vault", func(t *testing.T) {
		wctx, stop := context.WithCancel(context.Background())
		cmd := exec.CommandContext(wctx, "sh", "../../deploy/vault/init.sh")
		cmd.Env = append(slices.Clone(env), "VAULT_WATCH_INTERVAL=0.2")
		var watchOut testenv.LogBuffer
		cmd.Stdout, cmd.Stderr = &watchOut, &watchOut
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stop(); _ = cmd.Wait() })
		waitFor(t, "the watcher's first setup", func() bool {
			_, err := os.Stat(filepath.Join(dir, "ready"))
			return err == nil
		})
		vs.Restart(t)
		waitFor(t, "the watcher to unseal the restarted Vault", func() bool { return !vs.Sealed(t) })
		vs.WaitActive(t)
		decrypts(t)
		noSecrets(t, watchOut.String(), unsealKey, rootToken)
	})
}

func newTransit(t *testing.T, addr, token, key string) *transit.Vault {
	t.Helper()
	v, err := transit.NewVault(context.Background(), transit.VaultConfig{Addr: addr, Token: token, Key: key}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("NewVault with key %s: %v", key, err)
	}
	t.Cleanup(func() { _ = v.Close() })
	return v
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
