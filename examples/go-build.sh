#!/usr/bin/env bash
# Builds the Go example in directory $1 (examples/<name>) as a static binary (CGO off, so it
# runs FROM scratch) into a cache keyed by its sources, and prints the binary's path on stdout:
#
#   $WSRELAY_CACHE/bin/<name>-<hash of go.mod, go.sum, *.go, build.sh, this script>/<name>
#
# An unchanged source costs a hash; a changed one builds again and drops the older builds,
# as e2e/cluster/tools.sh does for the pinned tools. Each example's build.sh calls it.
set -euo pipefail

here=$(cd "$1" && pwd)
name=$(basename "$here")
self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/go-build.sh
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

key=$(cd "$here" && cat go.mod go.sum build.sh "$self" $(ls -- *.go | grep -v '_test\.go$' | LC_ALL=C sort) | sha256sum | cut -c1-12)
dir=$cache/bin/$name-$key
if [[ ! -f $dir/.done ]]; then
    echo "$name: building into $dir" >&2
    mkdir -p "$cache/bin"
    # A directory of this run's own: images/build.sh and tests may build at the same time.
    tmp=$(mktemp -d "$dir.tmp.XXXXXX") && chmod 755 "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    # -trimpath and no VCS stamp: the same sources give the same binary, so an image's
    # digest changes only with them.
    (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$tmp/$name" .)
    touch "$tmp/.done"
    rm -rf "$dir" && mv -T "$tmp" "$dir"
    find "$cache/bin" -maxdepth 1 -name "$name-*" ! -name "$(basename "$dir")" ! -name '*.tmp.*' -exec rm -rf {} +
fi
echo "$dir/$name"
