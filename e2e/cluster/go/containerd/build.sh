# on-demand: only the node tier (node-up.sh) needs containerd.
# Builds containerd, its runc shim and ctr into $1. Sourced by tools.sh inside this
# directory; `pinned` comes from tools.sh. CGO stays off: the cgo-only snapshotters
# (btrfs) drop out by their build tags, devmapper and zfs are left out as unused.
v=$(pinned containerd github.com/containerd/containerd/v2)
go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
	-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$v" -o "$1/" \
	github.com/containerd/containerd/v2/cmd/containerd \
	github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
	github.com/containerd/containerd/v2/cmd/ctr
