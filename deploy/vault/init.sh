#!/bin/sh
# One-shot Vault setup for docker-compose: enable transit, create the derived
# keys (customer secrets; the gateway's token-cache data keys), forbid implicit
# key creation, and write each service's least-privilege policy.
set -eu
export VAULT_ADDR="${VAULT_ADDR:-http://vault:8200}"
until vault status >/dev/null 2>&1; do sleep 1; done
vault secrets list | grep -q '^transit/' || vault secrets enable transit
for key in fleetbroker fleetbroker-gateway; do
  vault read "transit/keys/$key" >/dev/null 2>&1 || vault write -f "transit/keys/$key" derived=true type=aes256-gcm96
done
vault write transit/config/keys disable_upsert=true
POLICY_DIR="${POLICY_DIR:-/policies}"
vault policy write fleetbroker-credentials "$POLICY_DIR/credentials.hcl"
vault policy write fleetbroker-gateway "$POLICY_DIR/gateway.hcl"
echo "vault-init: transit keys fleetbroker and fleetbroker-gateway (derived) ready"
