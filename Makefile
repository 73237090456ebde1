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
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install missing Debian packages the scripts need
	@$(CLUSTER)/deps.sh

.PHONY: tools
tools: deps ## build the pinned etcd, Kubernetes and nats-server binaries, and the Python examples' venv (cached)
	@$(CLUSTER)/tools.sh >/dev/null
	@examples/backend-python/setup.sh

# The node tier (kubelet, containerd, kube-proxy in a network namespace of its own) needs root;
# it is on by default for root and off otherwise. NODE=0 or NODE=1 says so explicitly.
NODE ?= $(shell [ "$$(id -u)" = 0 ] && echo 1 || echo 0)

.PHONY: cluster-up
cluster-up: tools ## start the local control plane and NATS on loopback, and the node (NODE=1, root)
	@$(CLUSTER)/up.sh $(TOOLS_PATH)
ifeq ($(NODE),1)
	@$(CLUSTER)/node-up.sh $(TOOLS_PATH)
endif

.PHONY: cluster-down
cluster-down: ## stop the local cluster and remove its state
	@$(CLUSTER)/down.sh

.PHONY: fmt-check
fmt-check: ## cargo fmt --check
	$(CARGO) fmt --all -- --check

.PHONY: lint
lint: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: sdk
sdk: ## build the TypeScript client SDK: clients/js/dist (ES modules, CommonJS, single-file ESM + IIFE bundles) and the npm tarball target/sdk/wsrelay-client-<version>.tgz
	cd clients/js && npm ci --no-audit --no-fund && npm run build

.PHONY: unit
unit: tools sdk ## unit and integration tests (real nats-server, headless Chromium, no cluster)
	$(CARGO) test --workspace --exclude wsrelay-e2e --locked

.PHONY: proptest-long
proptest-long: ## the relay's property tests (frame parser, subject renderer, config loader) over a million generated cases; not part of make test
	PROPTEST_CASES=$${PROPTEST_CASES:-150000} $(CARGO) test -p wsrelay --test properties --locked -- --nocapture

.PHONY: client-js
client-js: tools sdk ## the TypeScript client SDK (clients/js): unit tests, headless Chromium against a real relay and nats-server
	$(CARGO) build -p wsrelay --bin wsrelay --locked
	cd clients/js && WSRELAY_REQUIRE_BROWSER=1 WSRELAY_BIN=$(CURDIR)/target/debug/wsrelay npm test

.PHONY: images
images: ## build the relay, operator and pause OCI images without Docker (static binaries)
	@$(CLUSTER)/deps.sh images
	@images/build.sh

.PHONY: chart-check
chart-check: deps ## lint the Helm chart and check its rendered objects offline (helm lint, kubeconform -strict, drift)
	e2e/chart-check.sh

.PHONY: rules-check
rules-check: ## the chart's alert rules: promtool check rules, promtool test rules (every alert firing and not), a runbook each
	e2e/prometheus/check-rules.sh

.PHONY: e2e
e2e: cluster-up sdk ## end-to-end tests against the local cluster (with the node when NODE=1; the browser test uses the built SDK)
	@$(CLUSTER)/tools.sh helm prometheus >/dev/null
	@# The suites install the chart and the metrics APIService themselves: a `make demo`
	@# left running is uninstalled first (the script says so when it does).
	@e2e/demo.sh stop
	$(CARGO) build -p wsrelay --bin wsrelay --locked
	E2E_REQUIRE_NODE=$(NODE) WSRELAY_BIN=$(CURDIR)/target/debug/wsrelay $(CARGO) test -p wsrelay-e2e --locked -- --skip chart_gateway_clients --skip chaos_ --skip prometheus_scrapes --skip presence_
	@# The fleet suite alone, with its output: it prints the figures (times, messages lost).
	E2E_REQUIRE_NODE=$(NODE) $(CARGO) test -p wsrelay-e2e --locked --test fleet -- --nocapture
	@# Resumable channels under chaos, alone, with its output: 200 clients through a rolling
	@# update, a pod force-deleted and a relay SIGKILLed; it prints lost/duplicated/catch-up per case.
	E2E_REQUIRE_NODE=$(NODE) $(CARGO) test -p wsrelay-e2e --locked --test chaos -- --nocapture
	@# Presence, alone, with its output: 1,000 members over 20 channels on three relays through a
	@# rolling update, a relay SIGKILLed, and a relay gone while the operator is down.
	E2E_REQUIRE_NODE=$(NODE) $(CARGO) test -p wsrelay-e2e --locked --test presence -- --nocapture
	@# A real Prometheus scraping the fleet like the chart's PodMonitors; every dashboard query
	@# must return series under load (it prints the counts and which alerts' conditions hold).
	E2E_REQUIRE_NODE=$(NODE) $(CARGO) test -p wsrelay-e2e --locked --test observability -- --nocapture

.PHONY: kind-e2e
kind-e2e: ## the fleet and operator suites on a kind cluster: Docker if it answers, else podman (root) with a node image built here
	e2e/kind/run.sh

.PHONY: kind-node-image
kind-node-image: ## build the kind node image for podman offline (cached under ~/.cache/wsrelay/kind; root)
	e2e/kind/node-image.sh

.PHONY: kind-delete
kind-delete: ## delete the kind cluster a KIND_KEEP=1 run left
	e2e/kind/run.sh delete

.PHONY: test
# One full run gains nothing from incremental builds, which would double the workspace's share of
# target/; the disk it ends with is printed, as CI's disk is bounded (README).
test: export CARGO_INCREMENTAL := 0
test: fmt-check lint unit chart-check rules-check client-js e2e ## everything CI runs
	@echo "make test: target/ holds $$(du -sh target | cut -f1)"

.PHONY: bench
bench: tools ## wsrelay vs nats-server WebSocket vs Centrifugo vs a bare baseline, pinned cores, 3 trials: target/bench/, docs/benchmarks.md (BENCH_QUICK=1: one trial; BENCH_WORKLOADS=smoke: a minute)
	e2e/bench/run.sh

.PHONY: demo
demo: cluster-up sdk ## the chart, an example gateway, and the client SDK (from Node) receiving live NATS messages through the fleet
	@e2e/demo.sh
