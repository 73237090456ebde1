#!/usr/bin/env bash
# Builds the example presence reader as a static binary (CGO off, so it runs FROM
# scratch) into a cache keyed by its sources, and prints the binary's path on stdout:
#
#   $WSRELAY_CACHE/bin/presence-reader-<hash of go.mod, go.sum, *.go, this script>/presence-reader
#
# An unchanged source costs a hash; a changed one builds again and drops the older builds,
# as e2e/cluster/tools.sh does for the pinned tools. Used by the relay's test
# (relay/tests/presence_reader.rs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

key=$(cd "$here" && cat go.mod go.sum build.sh $(ls -- *.go | grep -v '_test\.go$' | LC_ALL=C sort) | sha256sum | cut -c1-12)
dir=$cache/bin/presence-reader-$key
if [[ ! -f $dir/.done ]]; then
    echo "presence-reader: building into $dir" >&2
    mkdir -p "$cache/bin"
    # A directory of this run's own: two tests may build at the same time.
    tmp=$(mktemp -d "$dir.tmp.XXXXXX") && chmod 755 "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    # -trimpath and no VCS stamp: the same sources give the same binary.
    (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$tmp/presence-reader" .)
    touch "$tmp/.done"
    rm -rf "$dir" && mv -T "$tmp" "$dir"
    find "$cache/bin" -maxdepth 1 -name 'presence-reader-*' ! -name "$(basename "$dir")" ! -name '*.tmp.*' -exec rm -rf {} +
fi
echo "$dir/presence-reader"
