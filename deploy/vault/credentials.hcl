# Vault policy of the credentials service on its transit key: encrypt and
# decrypt (validation, ResolveSecret, and rewrap, which Vault 1.21 cannot do
# for ciphertexts with associated data, so it decrypts and re-encrypts),
# and HMAC for fingerprints. Nothing else.
path "transit/encrypt/fleetbroker" { capabilities = ["update"] }
path "transit/decrypt/fleetbroker" { capabilities = ["update"] }
path "transit/hmac/fleetbroker/*"  { capabilities = ["update"] }
path "transit/hmac/fleetbroker"    { capabilities = ["update"] }
