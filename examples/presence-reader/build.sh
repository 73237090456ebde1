#!/usr/bin/env bash
# Builds the example presence reader (static, cached by its sources) and prints the binary's
# path: examples/go-build.sh does it. Used by the relay's test (relay/tests/presence_reader.rs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../go-build.sh" "$here"
