# Builds nats-server into $1. Sourced by tools.sh inside this directory.
go build -trimpath -ldflags "-s -w" -o "$1/nats-server" github.com/nats-io/nats-server/v2
