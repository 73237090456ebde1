# Builds crictl into $1. Sourced by e2e/kind/tools.sh inside this directory.
go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$(pinned crictl sigs.k8s.io/cri-tools)" \
	-o "$1/crictl" sigs.k8s.io/cri-tools/cmd/crictl
