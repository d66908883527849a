# Vault policy of the credentials service: encrypt, decrypt (validation and
# ResolveSecret), rewrap after rotation, fingerprints. Nothing else.
path "transit/encrypt/fleetbroker" { capabilities = ["update"] }
path "transit/decrypt/fleetbroker" { capabilities = ["update"] }
path "transit/rewrap/fleetbroker"  { capabilities = ["update"] }
path "transit/hmac/fleetbroker/*"  { capabilities = ["update"] }
path "transit/hmac/fleetbroker"    { capabilities = ["update"] }
