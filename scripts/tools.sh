#!/usr/bin/env bash
# Installs the pinned tools fleetbroker's build and tests need into
# $FLEETBROKER_TOOLS/bin (default ~/.cache/fleetbroker/tools/bin), building
# each only when its pinned version is missing:
#   buf, protoc-gen-go, protoc-gen-go-grpc  from the Go module proxy
#   vault 1.21.0                            built from tools/vault (10-15 min the first time)
# redis-server comes from the system: scripts/redis.sh installs it where it can.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="${FLEETBROKER_TOOLS:-$HOME/.cache/fleetbroker/tools}"
BIN="$TOOLS/bin"
mkdir -p "$BIN"

BUF_VERSION=v1.75.0
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
VAULT_VERSION=1.21.0

# install_go NAME PACKAGE VERSION: go install into a versioned file, then link.
install_go() {
  local name=$1 pkg=$2 version=$3
  local target="$TOOLS/$name-$version"
  if [[ ! -x "$target" ]]; then
    echo "tools: installing $name $version" >&2
    local tmp
    tmp="$(mktemp -d)"
    GOBIN="$tmp" go install "$pkg@$version"
    mv "$tmp/$name" "$target"
    rm -rf "$tmp"
  fi
  ln -sf "$target" "$BIN/$name"
}

install_go buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
install_go protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install_go protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

vault_target="$TOOLS/vault-$VAULT_VERSION"
if [[ ! -x "$vault_target" ]]; then
  echo "tools: building vault $VAULT_VERSION from tools/vault (the first time only: about 10-13 minutes on 2 cores)" >&2
  (cd "$ROOT/tools/vault" && go build -trimpath -o "$vault_target.tmp" . && mv "$vault_target.tmp" "$vault_target")
fi
ln -sf "$vault_target" "$BIN/vault"

echo "tools: ready in $BIN" >&2
