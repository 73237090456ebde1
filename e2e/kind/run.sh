#!/usr/bin/env bash
# `make kind-e2e`: the fleet and operator end-to-end suites that run on this repository's own
# node, on a kind cluster. Runs with Docker where a Docker engine answers, else on podman with
# a node image built here without a registry (e2e/kind/node-image.sh). See e2e/kind/README.md.
#
#   1. kind itself from the Go module proxy (e2e/kind/go/kind, cached);
#   2. the project's images (images/build.sh: relay, operator, pause) and a NATS image from
#      the pinned nats-server (same build as the local cluster), as OCI archives;
#   3. the node image: upstream kindest/node:<pinned Kubernetes> with Docker, else
#      e2e/kind/node-image.sh (cached; rebuilt only when a pin changes);
#   4. kind create cluster (e2e/kind/cluster.yaml), kind load image-archive, NATS
#      (e2e/kind/nats.yaml);
#   5. the fleet suite (it installs the chart itself) and the operator suite, against the kind
#      cluster's kubeconfig (.kind/kubeconfig);
#   6. kind delete cluster (KIND_KEEP=1 keeps it).
#
# Environment: KIND_CLUSTER (default wsrelay-e2e), KIND_PROVIDER (docker or podman; default
# docker when `docker info` answers, else podman), KIND_NODE_IMAGE (overrides the node
# image), KIND_IMAGES_DIR (use the archives there instead of running images/build.sh),
# KIND_KEEP=1, E2E_WAIT_SECONDS (default 300).
# usage: run.sh            the whole run
#        run.sh delete     delete the cluster a KIND_KEEP=1 run left
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# kind create/delete write the cluster into $KUBECONFIG and make it the current context; make
# exports the local cluster's kubeconfig (.cluster/kubeconfig), which must stay untouched.
mkdir -p "$root/.kind"
export KUBECONFIG=$root/.kind/kind-cli.kubeconfig
cd "$root"
name=${KIND_CLUSTER:-wsrelay-e2e}
log() { printf '[kind-e2e] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
t0=$SECONDS
phase() { log "$1 ($((SECONDS - t0))s since start)"; }

# --- provider --------------------------------------------------------------------------------
provider=${KIND_PROVIDER:-}
if [ -z "$provider" ]; then
	if command -v docker >/dev/null && docker info >/dev/null 2>&1; then provider=docker; else provider=podman; fi
fi
case $provider in
docker) ;;
podman)
	[ "$(id -u)" -eq 0 ] || die "no Docker engine answers, and kind on podman needs root (rootful podman, debootstrap, the kind bridge)"
	missing=()
	command -v podman >/dev/null || missing+=(podman)
	command -v debootstrap >/dev/null || missing+=(debootstrap)
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing ${missing[*]} (Debian)"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	# shellcheck source=e2e/kind/podman.sh
	source "$here/podman.sh"
	podman_setup
	;;
*) die "KIND_PROVIDER=$provider: docker or podman" ;;
esac
log "provider: $provider"

# The route to kind's pods (podSubnet) this script adds on this machine, see below. Routes it
# adds carry this protocol number, and only those are ever removed.
pod_subnet=$(awk '$1 == "podSubnet:" { print $2 }' "$here/cluster.yaml")
route_proto=203
pod_route_del() { if [ "$(id -u)" -eq 0 ]; then ip route flush exact "$pod_subnet" proto "$route_proto" || true; fi; }

if [ "${1:-}" = delete ]; then
	export PATH=$("$here/tools.sh" kind):$PATH
	kind delete cluster --name "$name" >&2
	pod_route_del
	if [ "$provider" = podman ]; then bridge_down; fi
	exit 0
fi

# --- tools -----------------------------------------------------------------------------------
"$root/e2e/cluster/deps.sh" images
tools_path=$("$root/e2e/cluster/tools.sh")
"$root/e2e/cluster/tools.sh" helm >/dev/null
kind_bin=$("$here/tools.sh" kind)
export PATH=$kind_bin:$tools_path:$PATH
k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' e2e/cluster/go/kubernetes/go.mod)
nats_version=$(awk '$1 == "require" && $2 == "github.com/nats-io/nats-server/v2" { print $3 }' e2e/cluster/go/nats/go.mod)

# --- images ----------------------------------------------------------------------------------
if [ -n "${KIND_IMAGES_DIR:-}" ]; then
	images_dir=$KIND_IMAGES_DIR
	log "using the image archives in $images_dir (KIND_IMAGES_DIR)"
else
	phase "building the project's images (images/build.sh)"
	images_dir=$(images/build.sh)
fi
mkdir -p .kind
nats_image=wsrelay.local/kind/nats:$nats_version
SOURCE_DATE_EPOCH=0 python3 images/oci.py --out .kind/nats.oci.tar --name "$nats_image" \
	--file "/usr/local/bin/nats-server=$(readlink -f "$tools_path/nats-server")" --passwd \
	--entrypoint /usr/local/bin/nats-server --port 4222/tcp --port 8222/tcp 2>/dev/null
archives=("$images_dir"/*.oci.tar .kind/nats.oci.tar)

config=.kind/cluster.yaml
cp e2e/kind/cluster.yaml "$config"
if [ -n "${KIND_NODE_IMAGE:-}" ]; then
	node_image=$KIND_NODE_IMAGE
elif [ "$provider" = docker ]; then
	node_image=kindest/node:$k8s_version
else
	phase "node image (e2e/kind/node-image.sh)"
	node_image=$("$here/node-image.sh")
fi
if [[ $node_image == localhost/wsrelay/kind-node:* ]]; then
	# The node image built here holds the images kubeadm runs as wsrelay.local/kind/*, and
	# etcd at the project's pin rather than kubeadm's default tag.
	etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" { print $3 }' e2e/cluster/go/etcd/go.mod)
	cat >>"$config" <<YAML
  # Added by e2e/kind/run.sh for the node image built here (e2e/kind/node-image.sh).
  - |
    kind: ClusterConfiguration
    imageRepository: wsrelay.local/kind
    etcd:
      local:
        imageTag: $etcd_version
YAML
fi

# --- cluster ---------------------------------------------------------------------------------
created_lib_modules=
pod_route=
cleanup() {
	local rc=$?
	if [ "${KIND_KEEP:-0}" = 1 ]; then
		log "KIND_KEEP=1: cluster $name kept (KUBECONFIG=$root/.kind/kubeconfig); delete with: make kind-delete"
	else
		log "deleting kind cluster $name"
		timeout 120 kind delete cluster --name "$name" >&2 || log "kind delete cluster failed"
		if [ -n "$pod_route" ]; then pod_route_del; fi
		if [ "$provider" = podman ]; then bridge_down; fi
	fi
	if [ -n "$created_lib_modules" ]; then rmdir /lib/modules 2>/dev/null || true; fi
	log "total $((SECONDS - t0))s, exit $rc"
}
trap cleanup EXIT
if [ "$provider" = podman ]; then
	bridge_up
	# kind bind-mounts the host's /lib/modules read-only into the node; this machine has none.
	if [ ! -e /lib/modules ]; then mkdir /lib/modules && created_lib_modules=1; fi
fi
# The pods' addresses from this machine: the operator suite runs the operator here, and it
# scrapes each relay pod's admin port at the pod's IP. This machine has no route to kind's
# podSubnet, so those connections used to leave by the default route (and something beyond
# it answered "426 Upgrade Required"). The range is unreachable until the node exists, then
# routed to the node, which forwards to its pods; this machine only ends those connections,
# it forwards nothing. Removed with the cluster.
if [ "$(id -u)" -eq 0 ]; then
	other=$(ip -4 route show exact "$pod_subnet" | grep -v "proto $route_proto" || true)
	[ -z "$other" ] || die "this machine already routes kind's podSubnet $pod_subnet ($other): choose another in e2e/kind/cluster.yaml"
	ip route replace unreachable "$pod_subnet" proto "$route_proto"
	pod_route=1
else
	log "not root: no route to the pods ($pod_subnet); the operator suite's scrapes of the relay pods follow this machine's default route"
fi
if kind get clusters 2>/dev/null | grep -qx "$name"; then
	log "kind cluster $name exists: deleting it first"
	kind delete cluster --name "$name" >&2
fi
phase "creating kind cluster $name ($node_image)"
t=$SECONDS
timeout 600 kind create cluster --name "$name" --config "$config" --image "$node_image" --wait 180s >&2
create_s=$((SECONDS - t))
kubeconfig=$root/.kind/kubeconfig
if [ "$provider" = podman ]; then
	# No port is published on the host (see podman.sh): reach the API server at the node's
	# address on the kind bridge, which its serving certificate names.
	node_ip=$(podman inspect -f "{{(index .NetworkSettings.Networks \"$KIND_NET\").IPAddress}}" "$name-control-plane")
	kind get kubeconfig --name "$name" --internal | sed "s#server: https://$name-control-plane:6443#server: https://$node_ip:6443#" >"$kubeconfig"
else
	kind get kubeconfig --name "$name" >"$kubeconfig"
fi
export KUBECONFIG=$kubeconfig
kubectl get nodes -o wide >&2
log "cluster created in ${create_s}s"

phase "loading images"
for a in "${archives[@]}"; do kind load image-archive --name "$name" "$a" >&2; done

phase "installing NATS $nats_version"
sed "s#NATS_IMAGE#$nats_image#" e2e/kind/nats.yaml | kubectl apply -f - >&2
kubectl -n wsrelay-nats rollout status deploy/nats --timeout 180s >&2
node_ip=$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')
if [ -n "$pod_route" ]; then
	ip route replace "$pod_subnet" via "$node_ip" proto "$route_proto"
	log "pods ($pod_subnet) routed to the node: $(ip -4 route show exact "$pod_subnet")"
fi

export NATS_URL="nats://$node_ip:30422"
export E2E_GATEWAY_NATS_URL="nats://nats.wsrelay-nats.svc:4222"
export E2E_SERVICE_ACCESS=node-port
export E2E_REQUIRE_NODE=1
export E2E_WAIT_SECONDS=${E2E_WAIT_SECONDS:-300}
# Where the API server reaches this machine (the webhook test serves it in-process): the
# host's end of the kind bridge with podman, the kind network's gateway with Docker.
if [ "$provider" = podman ]; then
	export E2E_CALLBACK_IP=$KIND_SUBNET.1
else
	E2E_CALLBACK_IP=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -m1 '\.')
	export E2E_CALLBACK_IP
fi
phase "running the fleet and operator suites against $name (node $node_ip)"
t=$SECONDS
cargo test -p wsrelay-e2e --locked --test fleet --test operator -- --nocapture
log "suites passed in $((SECONDS - t))s"
