# wsrelay: build, test and demo entry points. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CLUSTER := e2e/cluster
export WSRELAY_CACHE ?= $(HOME)/.cache/wsrelay
# The pinned Go binaries (etcd, kube-*, nats-server) are linked here by tools.sh.
TOOLS_PATH := $(WSRELAY_CACHE)/path
export PATH := $(TOOLS_PATH):$(PATH)
# The local cluster's kubeconfig, used by every target here whatever KUBECONFIG says, so the
# suite never runs against a cluster the developer happens to be pointed at.
export KUBECONFIG := $(CURDIR)/.cluster/kubeconfig
CARGO ?= cargo

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install missing Debian packages the scripts need
	@$(CLUSTER)/deps.sh

.PHONY: tools
tools: deps ## build the pinned etcd, Kubernetes and nats-server binaries (cached)
	@$(CLUSTER)/tools.sh >/dev/null

.PHONY: cluster-up
cluster-up: tools ## start the local control plane and NATS on loopback
	@$(CLUSTER)/up.sh $(TOOLS_PATH)

.PHONY: cluster-down
cluster-down: ## stop the local cluster and remove its state
	@$(CLUSTER)/down.sh

.PHONY: fmt-check
fmt-check: ## cargo fmt --check
	$(CARGO) fmt --all -- --check

.PHONY: lint
lint: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: unit
unit: tools ## unit and integration tests (real nats-server, no cluster)
	$(CARGO) test --workspace --exclude wsrelay-e2e --locked

.PHONY: e2e
e2e: cluster-up ## end-to-end tests against the local cluster
	$(CARGO) build -p wsrelay --bin wsrelay --locked
	WSRELAY_BIN=$(CURDIR)/target/debug/wsrelay $(CARGO) test -p wsrelay-e2e --locked

.PHONY: test
test: fmt-check lint unit e2e ## everything CI runs

.PHONY: bench
bench: tools ## wsrelay vs nats-server WebSocket vs centrifuge, one client: target/bench/, docs/benchmarks.md (~8 min)
	e2e/bench/run.sh

.PHONY: demo
demo: cluster-up ## the local cluster, NATS, the operator and an example gateway
	@e2e/demo.sh
