# on-demand: only `make bench` needs it, so tools.sh skips it unless named.
# The Centrifugo-design benchmark peer: the centrifuge library behind a minimal main.go.
go build -trimpath -ldflags "-s -w" -o "$1/centrifuge-bench" .
