#!/bin/sh
# One-shot Vault setup for docker-compose: enable transit, create the derived
# key, forbid implicit key creation, and write the credentials service policy.
set -eu
export VAULT_ADDR="${VAULT_ADDR:-http://vault:8200}"
until vault status >/dev/null 2>&1; do sleep 1; done
vault secrets list | grep -q '^transit/' || vault secrets enable transit
vault read transit/keys/fleetbroker >/dev/null 2>&1 || vault write -f transit/keys/fleetbroker derived=true type=aes256-gcm96
vault write transit/config/keys disable_upsert=true
vault policy write fleetbroker-credentials /policies/credentials.hcl
echo "vault-init: transit key fleetbroker (derived) ready"
