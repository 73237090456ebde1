#!/usr/bin/env bash
# Installs the Debian packages the test ground needs when a command is missing (idempotent:
# nothing is installed when everything is present). Go and Rust come with the machine.
set -euo pipefail
declare -A pkg=([openssl]=openssl [curl]=curl [setsid]=util-linux [sha256sum]=coreutils [ip]=iproute2)
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
