# on-demand: only the chart check needs it (e2e/chart-check.sh builds it).
# Builds kubeconform into $1. Sourced by tools.sh inside this directory.
go build -trimpath -ldflags "-s -w" -o "$1/kubeconform" github.com/yannh/kubeconform/cmd/kubeconform
