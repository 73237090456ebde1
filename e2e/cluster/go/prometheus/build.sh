# on-demand: only the observability e2e test (e2e/tests/observability.rs) and the rule check
# (e2e/prometheus/check-rules.sh) need it.
# Builds prometheus and promtool into $1. Sourced by tools.sh inside this directory; `pinned`
# comes from tools.sh. Without the builtinassets tag the server has no web UI (its HTTP API,
# which the tests use, is all there); the version stamp is the Go module version.
v=$(pinned prometheus github.com/prometheus/prometheus)
go build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$v" \
	-o "$1/" github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
