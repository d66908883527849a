# Vault policy of the telematics gateway: data keys for its token cache, on
# its own transit key. It cannot decrypt customer secrets (key fleetbroker).
path "transit/datakey/wrapped/fleetbroker-gateway" { capabilities = ["update"] }
path "transit/decrypt/fleetbroker-gateway"         { capabilities = ["update"] }
