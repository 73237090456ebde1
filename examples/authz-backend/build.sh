#!/usr/bin/env bash
# Builds the example authorization backend (static, cached by its sources) and prints the
# binary's path: examples/go-build.sh does it. Used by images/build.sh and the relay's test
# (relay/tests/authz_backend.rs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../go-build.sh" "$here"
