# on-demand: only node-check.sh needs it.
# Builds nodecheck (this module's main.go) static, for a FROM-scratch image.
go build -trimpath -ldflags "-s -w" -o "$1/" .
