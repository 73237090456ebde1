# on-demand: only `make bench` needs it, so tools.sh skips it unless named.
# Builds Centrifugo (the real server, github.com/centrifugal/centrifugo/v6) into $1, with its
# version stamped as its release workflow does. Sourced by tools.sh inside this directory;
# `pinned` comes from tools.sh.
v=$(pinned centrifugo github.com/centrifugal/centrifugo/v6)
go build -trimpath -ldflags "-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version=${v#v}" \
	-o "$1/centrifugo" github.com/centrifugal/centrifugo/v6
