# Builds coredns (with its default plugin set) into $1. Sourced by e2e/kind/tools.sh.
go build -trimpath -ldflags "-s -w" -o "$1/coredns" github.com/coredns/coredns
