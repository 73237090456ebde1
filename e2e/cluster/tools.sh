#!/usr/bin/env bash
# Builds the pinned Go binaries the test ground runs (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, etcd, nats-server;
# on demand containerd and nodecheck for the node tier, Centrifugo for `make bench`) from the
# Go module proxy into a cache outside the checkout, and prints the directory.
#
# Each wrapper module under e2e/cluster/go/ is one pin with its recipe (build.sh); its
# binaries land in
#   $WSRELAY_CACHE/bin/<module>-<hash of go.mod, go.sum and build.sh>/
# so a changed pin builds again and an unchanged one costs nothing.
#
# usage: tools.sh [module ...]    (default: every module not marked on-demand)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

log() { printf '[tools] %s\n' "$*" >&2; }

# A module's build directory is keyed by its pin and its recipe, so changing one module
# rebuilds only that module.
key() { cat "$here/go/$1/go.mod" "$here/go/$1/go.sum" "$here/go/$1/build.sh" | sha256sum | cut -c1-12; }

# The release a wrapper pins, read from its go.mod: "v1.37.2" for kubernetes.
pinned() { awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m && NF == 2 { print $2 }' "$here/go/$1/go.mod" | head -n1; }

# Runs go/<module>/build.sh (its recipe) inside the module with the output directory as $1.
build() { (cd "$here/go/$1" && set -- "$2" && source ./build.sh); }

mods=("$@")
if [ ${#mods[@]} -eq 0 ]; then
	# Every module, except those whose recipe says it is built on demand.
	for f in "$here"/go/*/build.sh; do
		grep -q '^# on-demand' "$f" || mods+=("$(basename "$(dirname "$f")")")
	done
fi
mkdir -p "$cache/bin" "$cache/path"
for m in "${mods[@]}"; do
	dir="$cache/bin/$m-$(key "$m")"
	if [ ! -f "$dir/.done" ]; then
		log "building $m into $dir (new pin or recipe)"
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
		start=$SECONDS
		build "$m" "$dir.tmp"
		rm -rf "$dir" && mv "$dir.tmp" "$dir" && touch "$dir/.done"
		log "built $m in $((SECONDS - start))s"
		# Drop builds of older pins of this module.
		find "$cache/bin" -maxdepth 1 -name "$m-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
	fi
	# One stable directory of links for PATH.
	for f in "$dir"/*; do ln -sfn "$f" "$cache/path/$(basename "$f")"; done
done
echo "$cache/path"
