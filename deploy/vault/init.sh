#!/bin/sh
# Vault setup for fleetbroker: enable transit, create the derived keys
# (customer secrets; the gateway's token-cache data keys), forbid implicit
# key creation, and write each service's least-privilege policy. Idempotent:
# run it as often as you like; it never replaces a key.
#
# Against your own Vault: VAULT_ADDR and VAULT_TOKEN (allowed to mount
# engines, create keys and write policies), and POLICY_DIR, the directory
# holding credentials.hcl and gateway.hcl.
#
# docker-compose (a real Vault server on file storage, see
# docker-compose.yml) also sets:
#   VAULT_INIT_DIR        initialize Vault if it is not (one key share) and
#                         keep its unseal key and root token there (0600);
#                         unseal it whenever it is sealed. For a local stack
#                         only: the key that unseals Vault lies next to it.
#   CREDENTIALS_TOKEN_ID, GATEWAY_TOKEN_ID
#                         create (or recreate, once expired) a periodic
#                         token with this id and the service's policy; the
#                         services renew their token themselves.
#   VAULT_WATCH_INTERVAL  keep running and check every this many seconds,
#                         so a restarted Vault is unsealed again at once;
#                         VAULT_READY_FILE (/tmp/vault-ready) is created once
#                         the first setup is done, for a health check.
# Nothing secret is ever printed.
set -eu
export VAULT_ADDR="${VAULT_ADDR:-http://vault:8200}"
POLICY_DIR="${POLICY_DIR:-/policies}"
INIT_DIR="${VAULT_INIT_DIR:-}"

log() { echo "vault-init: $*"; }

# wait_for_vault waits until Vault answers at all (sealed or not).
wait_for_vault() {
  while :; do
    # vault status: 0 unsealed, 2 sealed, 1 unreachable or error.
    rc=0
    vault status >/dev/null 2>&1 || rc=$?
    [ "$rc" -ne 1 ] && return 0
    sleep 1
  done
}

# init_vault initializes an uninitialized Vault, writing the output (unseal
# key, root token) to the init directory before anything else can fail.
init_vault() {
  rc=0
  vault operator init -status >/dev/null 2>&1 || rc=$?
  case "$rc" in
    0) return 0 ;;
    2) ;;
    *) log "cannot tell whether Vault is initialized"; return 1 ;;
  esac
  [ -s "$INIT_DIR/unseal-key" ] && { log "Vault is not initialized but $INIT_DIR holds keys of another; refusing"; return 1; }
  mkdir -p "$INIT_DIR" || return 1
  (
    set -e
    umask 077
    vault operator init -key-shares=1 -key-threshold=1 >"$INIT_DIR/init.out"
    sed -n 's/^Unseal Key 1: //p' "$INIT_DIR/init.out" >"$INIT_DIR/unseal-key.tmp"
    sed -n 's/^Initial Root Token: //p' "$INIT_DIR/init.out" >"$INIT_DIR/root-token.tmp"
    [ -s "$INIT_DIR/unseal-key.tmp" ] && [ -s "$INIT_DIR/root-token.tmp" ]
    mv "$INIT_DIR/unseal-key.tmp" "$INIT_DIR/unseal-key"
    mv "$INIT_DIR/root-token.tmp" "$INIT_DIR/root-token"
    rm -f "$INIT_DIR/init.out"
  ) || { log "initialization output could not be saved; see $INIT_DIR/init.out"; return 1; }
  log "initialized Vault (one key share, kept in $INIT_DIR)"
}

# unseal_vault unseals a sealed Vault with the kept key.
unseal_vault() {
  rc=0
  vault status >/dev/null 2>&1 || rc=$?
  [ "$rc" -ne 2 ] && return 0
  # The key is read from its file (@), never put on a command line.
  vault write sys/unseal key=@"$INIT_DIR/unseal-key" >/dev/null || return 1
  log "unsealed Vault"
}

# Every step returns on failure by itself: in the watch loop the functions
# run where `set -e` does not apply.
configure() {
  mounts=$(vault secrets list) || return 1
  printf '%s\n' "$mounts" | grep -q '^transit/' || vault secrets enable transit >/dev/null || return 1
  for key in fleetbroker fleetbroker-gateway; do
    vault read "transit/keys/$key" >/dev/null 2>&1 ||
      vault write -f "transit/keys/$key" derived=true type=aes256-gcm96 >/dev/null || return 1
  done
  vault write transit/config/keys disable_upsert=true >/dev/null || return 1
  vault policy write fleetbroker-credentials "$POLICY_DIR/credentials.hcl" >/dev/null || return 1
  vault policy write fleetbroker-gateway "$POLICY_DIR/gateway.hcl" >/dev/null || return 1
  ensure_token "${CREDENTIALS_TOKEN_ID:-}" fleetbroker-credentials || return 1
  ensure_token "${GATEWAY_TOKEN_ID:-}" fleetbroker-gateway || return 1
  log "transit keys fleetbroker and fleetbroker-gateway (derived) ready"
}

# ensure_token creates a periodic, orphan token with a fixed id and one
# policy, unless it exists. Periodic: the service renews it forever; if
# the stack stays down longer than the period, the next run recreates it.
ensure_token() {
  id=$1 policy=$2
  [ -n "$id" ] || return 0
  vault token lookup "$id" >/dev/null 2>&1 && return 0
  vault token create -id="$id" -policy="$policy" -orphan -period=24h -display-name="$policy" >/dev/null || return 1
  log "created the $policy token"
}

# setup brings Vault to a usable state: initialized, unsealed, configured.
setup() {
  wait_for_vault
  if [ -n "$INIT_DIR" ]; then
    init_vault || return 1
    unseal_vault || return 1
    VAULT_TOKEN=$(cat "$INIT_DIR/root-token") || return 1
    export VAULT_TOKEN
  fi
  configure
}

setup
[ -n "${VAULT_WATCH_INTERVAL:-}" ] || exit 0
# Watch: whenever Vault comes back sealed (restarted), unseal and check
# the setup again. /tmp/vault-ready is the container's health signal.
touch "${VAULT_READY_FILE:-/tmp/vault-ready}"
while sleep "$VAULT_WATCH_INTERVAL"; do
  rc=0
  vault status >/dev/null 2>&1 || rc=$?
  if [ "$rc" -eq 2 ]; then
    setup || log "setup failed; retrying"
  fi
done
