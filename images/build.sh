#!/usr/bin/env bash
# Builds the relay, operator and pause images without Docker: static release binaries, then
# one OCI image archive each (images/oci.py); and the example authorization backend's image
# (examples/authz-backend, a static Go binary that its own build.sh caches by its sources).
# Prints the directory holding the archives on stdout; progress goes to stderr.
#
#   images/build.sh [OUT_DIR]     default: $WSRELAY_CACHE/images (~/.cache/wsrelay/images)
#
# Names come from images/images.env, the tag from the workspace version in Cargo.toml.
# An archive is rewritten only when its inputs (binary, oci.py, name, settings) change, so a
# second run costs a no-op cargo build and four hashes.
#
# Needs rustup, musl-gcc (Debian: musl-tools), go, python3 and file.
# Environment: CARGO_TARGET_DIR (default target/), WSRELAY_IMAGE_TARGET (default
# x86_64-unknown-linux-musl, added with rustup when missing; x86_64-unknown-linux-gnu links
# glibc statically instead), SOURCE_DATE_EPOCH (timestamps in the images; default 0, so the
# digest depends on the binaries only).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { echo "images: $*" >&2; }

# shellcheck source=images/images.env
. images/images.env
# The first `version = "..."` under [workspace.package].
version=$(awk '/^\[/ { section = $0 } section == "[workspace.package]" && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml)
[[ -n $version ]] || { log "no [workspace.package] version in Cargo.toml"; exit 1; }
source_url=$(awk '/^\[/ { section = $0 } section == "[workspace.package]" && $1 == "repository" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml)

# The Dockerfiles cannot read Cargo.toml for their labels: keep their default in step.
for f in images/*.Dockerfile; do
    grep -qx "ARG VERSION=$version" "$f" || { log "$f: ARG VERSION=$version expected (Cargo.toml)"; exit 1; }
done

out=${1:-${WSRELAY_CACHE:-$HOME/.cache/wsrelay}/images}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# musl gives a fully static binary whose resolver reads /etc/hosts and /etc/resolv.conf
# itself (the operator resolves the API server's name); glibc's static getaddrinfo wants NSS
# modules that FROM scratch lacks, so that route is opt-in and unverified. ring's C code
# needs musl-gcc (Debian: musl-tools).
target=${WSRELAY_IMAGE_TARGET:-x86_64-unknown-linux-musl}
case $target in
*-musl)
    command -v musl-gcc >/dev/null || { log "musl-gcc not found: apt-get install musl-tools"; exit 1; }
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target" >&2
    fi
    ;;
# --target keeps these flags off build scripts and proc macros, which run on the host.
*-gnu) export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" ;;
*) log "unsupported target $target"; exit 1 ;;
esac

# No debug info in the images (it is three quarters of a binary); the symbols stay, so a panic's
# backtrace still names functions. These only touch this --target's artifacts.
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo

log "cargo build --release --target $target (wsrelay, wsrelay-operator, wsrelay-pause)"
cargo build --release --locked --target "$target" \
    -p wsrelay --bin wsrelay \
    -p wsrelay-operator --bin wsrelay-operator \
    -p wsrelay-pause --bin wsrelay-pause >&2
bin=${CARGO_TARGET_DIR:-$root/target}/$target/release

# Nothing in FROM scratch to load a dynamic library from.
static() {
    file -b "$1" | grep -qE 'statically linked|static-pie linked' || { log "$1 is not statically linked: $(file -b "$1")"; exit 1; }
}
for b in wsrelay wsrelay-operator wsrelay-pause; do
    static "$bin/$b"
    # And it runs: what goes into the image is what printed this.
    "$bin/$b" --version >/dev/null || { log "$bin/$b --version failed"; exit 1; }
done

# CGO off, -trimpath, no VCS stamp: static, and the same sources give the same binary.
log "examples/authz-backend/build.sh"
authz_bin=$(examples/authz-backend/build.sh)
static "$authz_bin"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
# The writer and the files it adds are inputs too.
oci_sum=$(cat images/oci.py images/rootfs/etc/passwd images/rootfs/etc/group | sha256sum | cut -d' ' -f1)

# image NAME BINARY ARCHIVE ARGS...: the archive unless one with the same inputs exists.
image() {
    local name=$1 binary=$2 archive=$out/$3
    shift 3
    local key
    key=$(printf '%s\n' "$name" "$SOURCE_DATE_EPOCH" "$oci_sum" "$(sha256sum "$binary" | cut -d' ' -f1)" "$@" | sha256sum | cut -d' ' -f1)
    if [[ -f $archive && -f $archive.key && $(<"$archive.key") == "$key" ]]; then
        log "$name: up to date ($archive)"
        return
    fi
    python3 images/oci.py --out "$archive" --name "$name" "$@"
    echo "$key" >"$archive.key"
    log "$name: $archive ($(du -h "$archive" | cut -f1))"
}

labels() {
    printf -- '--label\0%s\0' \
        "org.opencontainers.image.source=$source_url" \
        "org.opencontainers.image.version=$version" \
        "org.opencontainers.image.title=$1" \
        "org.opencontainers.image.description=$2" \
        "org.opencontainers.image.licenses=Apache-2.0"
}

mapfile -d '' relay_labels < <(labels wsrelay "WebSocket relay between browsers and NATS")
image "$RELAY_IMAGE:$version" "$bin/wsrelay" "wsrelay-$version.oci.tar" \
    --file "/usr/local/bin/wsrelay=$bin/wsrelay" --passwd \
    --entrypoint /usr/local/bin/wsrelay --user 65532:65532 \
    --port 8080/tcp --port 9090/tcp "${relay_labels[@]}"

mapfile -d '' operator_labels < <(labels wsrelay-operator "Kubernetes operator for wsrelay WebSocket gateways")
image "$OPERATOR_IMAGE:$version" "$bin/wsrelay-operator" "wsrelay-operator-$version.oci.tar" \
    --file "/usr/local/bin/wsrelay-operator=$bin/wsrelay-operator" --passwd \
    --entrypoint /usr/local/bin/wsrelay-operator --cmd run --user 65532:65532 \
    --port 8080/tcp "${operator_labels[@]}"

# The same user as the upstream pause image, which this one stands in for.
mapfile -d '' pause_labels < <(labels pause "Pod sandbox process: holds the namespaces, reaps orphans")
image "$PAUSE_IMAGE:$version" "$bin/wsrelay-pause" "pause-$version.oci.tar" \
    --file "/pause=$bin/wsrelay-pause" \
    --entrypoint /pause --user 65535:65535 "${pause_labels[@]}"

# The example backend needs no files besides itself (no user lookup, no TLS roots for a
# plain nats:// URL): numeric non-root user, no ports (it only dials NATS).
mapfile -d '' authz_labels < <(labels authz-example "Example wsrelay authorization backend: answers authorize.request over NATS")
image "$AUTHZ_EXAMPLE_IMAGE:$version" "$authz_bin" "authz-example-$version.oci.tar" \
    --file "/usr/local/bin/authz-backend=$authz_bin" \
    --entrypoint /usr/local/bin/authz-backend --user 65532:65532 "${authz_labels[@]}"

echo "$out"
