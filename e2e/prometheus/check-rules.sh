#!/usr/bin/env bash
# Checks the chart's alert rules with the pinned promtool (built from the Go module proxy by
# e2e/cluster/tools.sh prometheus): `promtool check rules` on
# charts/wsrelay-operator/monitoring/alerts.yaml, then `promtool test rules` on
# e2e/prometheus/alerts.test.yaml (every alert firing and not firing), and checks that every
# alert has a test and a runbook section in docs/operations.md.
#
# usage: e2e/prometheus/check-rules.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
rules=$root/charts/wsrelay-operator/monitoring/alerts.yaml
tests=$root/e2e/prometheus/alerts.test.yaml
log() { printf '[check-rules] %s\n' "$*" >&2; }
fail() { printf '[check-rules] FAIL: %s\n' "$*" >&2; exit 1; }

PATH=$("$root/e2e/cluster/tools.sh" prometheus):$PATH
promtool check rules "$rules" >&2
(cd "$(dirname "$tests")" && promtool test rules "$(basename "$tests")") >&2
for alert in $(awk '$1 == "-" && $2 == "alert:" { print $3 }' "$rules"); do
	grep -q "alertname: $alert\$" "$tests" || fail "$alert has no unit test in $tests"
	anchor=$(tr '[:upper:]' '[:lower:]' <<<"$alert")
	grep -q "^#### $alert\$" "$root/docs/operations.md" ||
		fail "$alert has no runbook section '#### $alert' in docs/operations.md"
	grep -q "operations.md#$anchor\"" "$rules" || fail "$alert's runbook_url does not point at #$anchor"
done
log "ok: $(grep -c '^ *- alert:' "$rules") alerts checked, tested, with runbooks"
