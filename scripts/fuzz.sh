#!/usr/bin/env bash
# Runs every fuzz target of the module, one after another, for $FUZZTIME
# each (default 5s), and stops at the first failure.
#
# `go test -fuzz` fuzzes one target per package run, so the targets are run
# one at a time. They are found rather than listed here, so a new Fuzz*
# function is fuzzed without editing this script: a grep picks the packages
# whose test files declare one, and `go test -list` names the targets (it
# compiles the tests, so build tags and generated names are respected).
#
# Each run first replays the committed seed corpus in testdata/fuzz/. A
# failing input is written there by go test; commit it with the fix so it
# stays a regression test.
#
# Usage: scripts/fuzz.sh            (or FUZZTIME=30s scripts/fuzz.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZTIME="${FUZZTIME:-5s}"

# "import-path dir" of every package in this module; nested modules (such
# as tools/vault) are not part of ./... and are left out.
packages="$(go list -f '{{.ImportPath}} {{.Dir}}' ./...)"

count=0
while read -r pkg dir; do
  # Cheap filter first: only compile the tests of packages that have a target.
  grep -qs '^func Fuzz' "$dir"/*_test.go || continue
  listing="$(go test -list '^Fuzz' "$pkg" </dev/null)"
  for target in $(grep -E '^Fuzz' <<<"$listing" || true); do
    echo "==> $pkg $target ($FUZZTIME)"
    # -run '^$': the unit tests run in `make test`; here only the fuzz
    # target (which replays its seed corpus first) runs.
    go test "$pkg" -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" </dev/null
    count=$((count + 1))
  done
done <<<"$packages"

if [[ $count -eq 0 ]]; then
  echo "fuzz: no fuzz targets found" >&2
  exit 1
fi
echo "fuzz: $count targets passed"
