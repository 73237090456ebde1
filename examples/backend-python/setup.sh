#!/usr/bin/env bash
# Creates the Python virtualenv the backend examples run in, outside the checkout:
#
#   $WSRELAY_CACHE/venv   (default ~/.cache/wsrelay/venv)
#
# and installs requirements.txt into it. Idempotent and quiet: a stamp keyed by
# requirements.txt makes an unchanged pin cost a hash; a changed one installs again. Prints
# nothing on success (`make tools` runs it); relay/tests/backend.rs runs the
# examples with $WSRELAY_CACHE/venv/bin/python.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}/venv
stamp=$venv/.requirements-$(sha256sum "$here/requirements.txt" | cut -c1-12)
[[ -f $stamp && -x $venv/bin/python ]] && exit 0

echo "[backend-python] installing $here/requirements.txt into $venv" >&2
command -v python3 >/dev/null || { echo "[backend-python] python3 is required and not installed" >&2; exit 1; }
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$here/requirements.txt"
rm -f "$venv"/.requirements-*
touch "$stamp"
