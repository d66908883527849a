# Vault server configuration of the docker-compose stack: a real server (not
# -dev) on file storage in the vault-data volume, so a restart keeps every
# transit key, policy and token. It starts sealed; vault-init (init.sh)
# initializes it once and unseals it after every restart.
# Production: raft or another HA storage, TLS, and auto-unseal (cloud KMS,
# HSM or transit) instead of a kept unseal key; see docs/reliability.md.
storage "file" {
  path = "/vault/file"
}

listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true # inside the compose network only
}

api_addr      = "http://vault:8200"
disable_mlock = true
ui            = true
