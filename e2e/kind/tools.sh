#!/usr/bin/env bash
# Builds the Go binaries the kind run needs from the Go module proxy, the way
# e2e/cluster/tools.sh does for the local cluster: each wrapper module under e2e/kind/go/ is
# one pin with its recipe (build.sh), built into
#   $WSRELAY_CACHE/kind/bin/<module>-<hash of go.mod, go.sum and build.sh>/
# so a changed pin builds again and an unchanged one costs nothing. Prints that directory
# for each module asked for, one per line, in order.
#
#   kind     the kind CLI (sigs.k8s.io/kind)           coredns  CoreDNS for the node image
#   kubeadm  kubeadm of the cluster's Kubernetes pin   crictl   crictl for the node image
#
# usage: tools.sh MODULE...
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}/kind/bin
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

log() { printf '[kind-tools] %s\n' "$*" >&2; }
key() { cat "$here/go/$1/go.mod" "$here/go/$1/go.sum" "$here/go/$1/build.sh" | sha256sum | cut -c1-12; }
# The release a wrapper pins: pinned MODULE_DIR MODULE_PATH.
pinned() { awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m && NF == 2 { print $2 }' "$here/go/$1/go.mod" | head -n1; }
build() { (cd "$here/go/$1" && set -- "$2" && source ./build.sh); }

# kubeadm must be the release the rest of the node runs (kubelet, kube-apiserver... from
# e2e/cluster/go/kubernetes).
cluster_k8s=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$here/../cluster/go/kubernetes/go.mod")
if [ "$(pinned kubeadm k8s.io/kubernetes)" != "$cluster_k8s" ]; then
	log "e2e/kind/go/kubeadm pins k8s.io/kubernetes $(pinned kubeadm k8s.io/kubernetes), the cluster $cluster_k8s: keep them equal"
	exit 1
fi

mkdir -p "$cache"
for m in "$@"; do
	[ -f "$here/go/$m/build.sh" ] || { log "no module $m under $here/go"; exit 1; }
	dir="$cache/$m-$(key "$m")"
	if [ ! -f "$dir/.done" ]; then
		log "building $m into $dir (new pin or recipe)"
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
		start=$SECONDS
		build "$m" "$dir.tmp"
		rm -rf "$dir" && mv "$dir.tmp" "$dir" && touch "$dir/.done"
		log "built $m in $((SECONDS - start))s"
		find "$cache" -maxdepth 1 -name "$m-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
	fi
	echo "$dir"
done
