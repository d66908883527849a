#!/usr/bin/env bash
# Makes sure redis-server is on PATH for the tests, installing it where that
# needs no questions: apt-get on Debian/Ubuntu as root or with passwordless
# sudo, Homebrew on macOS. Otherwise it stops with the one command to run.
# FLEETBROKER_REDIS_BIN, if set, names the binary to use instead.
set -euo pipefail

if [[ -n "${FLEETBROKER_REDIS_BIN:-}" ]]; then
  [[ -x "$FLEETBROKER_REDIS_BIN" ]] || { echo "redis: FLEETBROKER_REDIS_BIN=$FLEETBROKER_REDIS_BIN is not executable" >&2; exit 1; }
  exit 0
fi
if command -v redis-server >/dev/null; then
  exit 0
fi

case "$(uname -s)" in
Linux)
  if command -v apt-get >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
      sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "redis-server is missing; install it with: sudo apt-get install -y redis-server" >&2
      exit 1
    fi
    echo "redis: installing redis-server with apt-get (about a minute)" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing; install it with your package manager (e.g. dnf install redis), or set FLEETBROKER_REDIS_BIN" >&2
    exit 1
  fi
  ;;
Darwin)
  if command -v brew >/dev/null; then
    echo "redis: installing redis with Homebrew" >&2
    brew install redis
  else
    echo "redis-server is missing; install it with: brew install redis (https://brew.sh)" >&2
    exit 1
  fi
  ;;
*)
  echo "redis-server is missing; install Redis 7 or later, or set FLEETBROKER_REDIS_BIN" >&2
  exit 1
  ;;
esac
command -v redis-server >/dev/null || { echo "redis: installed, but redis-server is not on PATH" >&2; exit 1; }
