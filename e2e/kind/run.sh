#!/usr/bin/env bash
# `make kind-e2e`: the same end-to-end suite that runs on this repository's own node, on a
# kind cluster, for machines with Docker. This repository's CI has no Docker and does not run
# it; see README.md.
#
#   1. create (or reuse) the kind cluster `wsrelay-e2e`;
#   2. build the relay, operator and pause images with the Dockerfiles under images/ (names and
#      tags from images/images.env) and load them into the cluster;
#   3. install NATS (e2e/kind/nats.yaml);
#   4. run the fleet suite (it installs the chart itself) and the operator suite.
#
# KIND_KEEP=1 keeps the cluster afterwards; it is deleted otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
name=${KIND_CLUSTER:-wsrelay-e2e}
log() { printf '[kind-e2e] %s\n' "$*" >&2; }

for cmd in docker kind kubectl helm cargo; do
	command -v "$cmd" >/dev/null || { log "$cmd is required (see README: make kind-e2e)"; exit 1; }
done
docker info >/dev/null 2>&1 || { log "no Docker engine answers (docker info failed)"; exit 1; }

# shellcheck source=../../images/images.env
source images/images.env
tag=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && $1 ~ /^version/ { print $2; exit }' Cargo.toml)

if ! kind get clusters | grep -qx "$name"; then
	log "creating kind cluster $name"
	kind create cluster --name "$name" --config e2e/kind/cluster.yaml --wait 120s
fi
mkdir -p .kind
kubeconfig=$root/.kind/kubeconfig
kind get kubeconfig --name "$name" >"$kubeconfig"
export KUBECONFIG=$kubeconfig
if [ "${KIND_KEEP:-0}" != 1 ]; then
	trap 'log "deleting kind cluster $name"; kind delete cluster --name "$name"' EXIT
fi

for image in relay operator pause; do
	var="${image^^}_IMAGE"
	ref="${!var}:$tag"
	log "building $ref"
	docker build -f "images/$image.Dockerfile" -t "$ref" .
	kind load docker-image --name "$name" "$ref"
done

log "installing NATS"
kubectl apply -f e2e/kind/nats.yaml
kubectl -n wsrelay-nats rollout status deploy/nats --timeout 180s
node_ip=$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')

export NATS_URL="nats://$node_ip:30422"
export E2E_GATEWAY_NATS_URL="nats://nats.wsrelay-nats.svc:4222"
export E2E_SERVICE_ACCESS=node-port
export E2E_REQUIRE_NODE=1
export E2E_WAIT_SECONDS=${E2E_WAIT_SECONDS:-300}
log "running the suite against $name (node $node_ip)"
cargo test -p wsrelay-e2e --locked --test fleet --test operator -- --nocapture
