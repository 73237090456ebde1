# Builds kubeadm of the pinned Kubernetes release into $1, with the version stamps
# e2e/cluster/go/kubernetes/build.sh gives the other binaries. Sourced by e2e/kind/tools.sh.
v=$(pinned kubeadm k8s.io/kubernetes)
major=${v#v}; major=${major%%.*}
minor=${v#v*.}; minor=${minor%%.*}
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
	ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
go build -trimpath -ldflags "$ld" -o "$1/kubeadm" k8s.io/kubernetes/cmd/kubeadm
