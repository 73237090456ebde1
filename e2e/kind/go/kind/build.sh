# Builds the kind CLI into $1. Sourced by e2e/kind/tools.sh inside this directory.
go build -trimpath -ldflags "-s -w" -o "$1/kind" sigs.k8s.io/kind
