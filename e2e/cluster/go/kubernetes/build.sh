# Builds the control plane and node binaries of the pinned Kubernetes release into $1.
# Sourced by tools.sh inside this directory; `pinned` comes from tools.sh.
v=$(pinned kubernetes k8s.io/kubernetes)
major=${v#v}; major=${major%%.*}
minor=${v#v*.}; minor=${minor%%.*}
# The same stamps hack/lib/version.sh sets, so /version reports the real release.
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
	ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
go build -trimpath -ldflags "$ld" -o "$1/" \
	k8s.io/kubernetes/cmd/kube-apiserver \
	k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler \
	k8s.io/kubernetes/cmd/kubelet \
	k8s.io/kubernetes/cmd/kube-proxy \
	k8s.io/kubernetes/cmd/kubectl
