#!/usr/bin/env bash
# Builds the pinned Go binaries the test ground runs (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl, etcd, nats-server) from the
# Go module proxy into a cache outside the checkout, and prints the directory.
#
# Each wrapper module under e2e/cluster/go/ is one pin; its binaries land in
#   $WSRELAY_CACHE/bin/<module>-<hash of go.mod, go.sum and this script>/
# so a changed pin builds again and an unchanged one costs nothing.
#
# usage: tools.sh [module ...]    (default: kubernetes etcd nats)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

log() { printf '[tools] %s\n' "$*" >&2; }

key() { cat "$here/go/$1/go.mod" "$here/go/$1/go.sum" "$here/tools.sh" | sha256sum | cut -c1-12; }

# The release a wrapper pins, read from its go.mod: "v1.37.2" for kubernetes.
pinned() { awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m && NF == 2 { print $2 }' "$here/go/$1/go.mod" | head -n1; }

build_kubernetes() {
	local out=$1 v major minor
	v=$(pinned kubernetes k8s.io/kubernetes)
	major=${v#v}; major=${major%%.*}
	minor=${v#v*.}; minor=${minor%%.*}
	# The same stamps hack/lib/version.sh sets, so /version reports the real release.
	local ld="-s -w"
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
		ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	(cd "$here/go/kubernetes" && go build -trimpath -ldflags "$ld" -o "$out/" \
		k8s.io/kubernetes/cmd/kube-apiserver \
		k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler \
		k8s.io/kubernetes/cmd/kubelet \
		k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
	(cd "$here/go/etcd" && go build -trimpath -ldflags "-s -w" -o "$1/etcd" .)
}

build_nats() {
	(cd "$here/go/nats" && go build -trimpath -ldflags "-s -w" -o "$1/nats-server" github.com/nats-io/nats-server/v2)
}

# The Centrifugo-design benchmark peer: the centrifuge library behind a minimal main.go.
build_centrifuge() {
	(cd "$here/go/centrifuge" && go build -trimpath -ldflags "-s -w" -o "$1/centrifuge-bench" .)
}

mods=("$@")
[ ${#mods[@]} -gt 0 ] || mods=(kubernetes etcd nats)
mkdir -p "$cache/bin" "$cache/path"
for m in "${mods[@]}"; do
	dir="$cache/bin/$m-$(key "$m")"
	if [ ! -f "$dir/.done" ]; then
		log "building $m into $dir (new pin; kubernetes takes minutes on 2 cores)"
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
		start=$SECONDS
		"build_$m" "$dir.tmp"
		rm -rf "$dir" && mv "$dir.tmp" "$dir" && touch "$dir/.done"
		log "built $m in $((SECONDS - start))s"
		# Drop builds of older pins of this module.
		find "$cache/bin" -maxdepth 1 -name "$m-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
	fi
	# One stable directory of links for PATH.
	for f in "$dir"/*; do ln -sfn "$f" "$cache/path/$(basename "$f")"; done
done
echo "$cache/path"
