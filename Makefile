# fleetbroker — the two commands that matter:
#   go run ./cmd/fleetbroker dev    run everything in one process
#   make test                       run every test against real Redis and Vault
TOOLS ?= $(HOME)/.cache/fleetbroker/tools
export PATH := $(TOOLS)/bin:$(PATH)
export FLEETBROKER_TOOLS := $(TOOLS)

.PHONY: all tools generate lint breaking check-generated fmt vet test test-fuzz check layering

all: check test

## tools: install the pinned buf, protoc plugins and Vault (see scripts/tools.sh)
tools:
	./scripts/tools.sh

## generate: regenerate gen/ from proto/
generate: tools
	buf generate

## lint: buf lint, gofmt and go vet
lint: tools
	buf lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: files above need formatting'; exit 1; }
	go vet ./...

## breaking: buf breaking against BREAKING_AGAINST (default: the main branch)
BREAKING_AGAINST ?= .git\#branch=main
breaking: tools
	buf breaking --against '$(BREAKING_AGAINST)'

## check-generated: fail if gen/ does not match proto/
check-generated: generate
	@git diff --exit-code -- gen/ || { echo 'gen/ is stale: run make generate and commit'; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard gen/)" || { echo 'gen/ has uncommitted files'; exit 1; }

## test: every test, with the race detector, against real redis-server and Vault
test: tools
	@scripts/redis.sh
	go test -race -count=1 -timeout 20m ./...

## layering: no internal/ package depends on services/, cmd/ or test/ (go list -deps; test/layering)
layering:
	go test -count=1 ./test/layering/

## test-fuzz: run every fuzz target briefly (seed corpora under */testdata/fuzz)
FUZZTIME ?= 10s
test-fuzz:
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

check: lint check-generated
