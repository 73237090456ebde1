#!/usr/bin/env bash
# Installs the Debian packages the test ground needs when a command is missing (idempotent:
# nothing is installed when everything is present). Go and Rust come with the machine.
# usage: deps.sh [images|node]    (images: what images/build.sh needs; node: the node tier,
#                                  which builds the images too)
set -euo pipefail
declare -A pkg=([openssl]=openssl [curl]=curl [setsid]=util-linux [sha256sum]=coreutils [ip]=iproute2)
# The relay's browser test drives Debian's Chromium, headless.
pkg+=([chromium]=chromium)
# The node tier (node-up.sh) runs containers: runc, the CNI plugins (not on PATH, so keyed by
# their path), socat to bridge loopback services into the node's netns, nft for kube-proxy.
[ "${1:-}" != node ] || pkg+=([runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins [socat]=socat [nft]=nftables)
# images/build.sh links static musl binaries and checks them with file.
case ${1:-} in images | node) pkg+=([musl-gcc]=musl-tools [file]=file) ;; esac
missing=()
for cmd in "${!pkg[@]}"; do command -v "$cmd" >/dev/null || missing+=("${pkg[$cmd]}"); done
for cmd in go cargo kubectl; do
	command -v "$cmd" >/dev/null || { echo "[deps] $cmd is required and not installed" >&2; exit 1; }
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[deps] installing ${missing[*]}" >&2
sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
