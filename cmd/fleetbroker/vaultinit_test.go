package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
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
