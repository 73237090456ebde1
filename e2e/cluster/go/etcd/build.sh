# Builds etcd (the wrapper's main.go) into $1. Sourced by tools.sh inside this directory.
go build -trimpath -ldflags "-s -w" -o "$1/etcd" .
