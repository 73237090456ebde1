# on-demand: only the chart check needs it (e2e/chart-check.sh builds it).
# Builds helm into $1. Sourced by tools.sh inside this directory; `pinned` comes from tools.sh.
# The stamp is the one Helm's Makefile sets for a tagged release, so `helm version` is real.
go build -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$(pinned helm helm.sh/helm/v4)" \
	-o "$1/helm" helm.sh/helm/v4/cmd/helm
