#!/usr/bin/env bash
# Builds a kind node image without Docker and without a registry, imports it into podman
# (`podman import`) and prints its reference. Cached: an image whose inputs have not changed
# is not built again (about a second to find out).
#
# What `kind build node-image` would do, from parts this machine can get:
#   - a Debian bookworm root filesystem (debootstrap --variant=minbase) with systemd, runc,
#     the CNI plugins, iptables/nftables and the other packages kind's base image installs
#     and the node needs; cached as a tarball keyed by suite, mirror and package list;
#   - kind's entrypoint, systemd units, sysctls and containerd configuration, read from the
#     pinned kind module (e2e/kind/go/kind: images/base/files) and set up as its
#     images/base/Dockerfile does;
#   - kubelet, kubectl (e2e/cluster/go/kubernetes), kubeadm and crictl (e2e/kind/go),
#     containerd, its shim and ctr (e2e/cluster/go/containerd), all built from the Go
#     module proxy at the project's pins;
#   - the images kubeadm runs, built here as OCI archives by images/oci.py from the same
#     binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy with
#     Debian's nft, etcd, CoreDNS at kubeadm's version, and pause from the pinned release's
#     build/pause/linux/pause.c) and imported into the image's containerd store, so the node
#     never pulls. They are named wsrelay.local/kind/*: e2e/kind/run.sh points kubeadm there
#     (imageRepository, etcd imageTag), as they are not the registry.k8s.io builds.
#   - CNI: a static ptp + host-local + portmap configuration for the node's pod range
#     (what kindnetd writes on a single node), since kindnetd's image cannot be pulled;
#     see e2e/kind/README.md.
#
# usage: node-image.sh        (root; needs podman, debootstrap, python3, musl-gcc)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=e2e/kind/podman.sh
source "$here/podman.sh"
log() { printf '[node-image] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts, rootful podman)"
for cmd in podman debootstrap python3 musl-gcc; do
	command -v "$cmd" >/dev/null || die "$cmd is required (e2e/kind/run.sh installs it)"
done
podman_setup
start=$SECONDS

# --- inputs -------------------------------------------------------------------------------
k8s_path=$("$root/e2e/cluster/tools.sh" kubernetes etcd containerd)
k8s=$(dirname "$(readlink -f "$k8s_path/kubelet")")
etcd=$(dirname "$(readlink -f "$k8s_path/etcd")")
containerd=$(dirname "$(readlink -f "$k8s_path/containerd")")
mapfile -t kt < <("$here/tools.sh" kubeadm crictl coredns)
kubeadm_dir=${kt[0]} crictl_dir=${kt[1]} coredns_dir=${kt[2]}
k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$root/e2e/cluster/go/kubernetes/go.mod")
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" { print $3 }' "$root/e2e/cluster/go/etcd/go.mod")
coredns_version=$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" { print $3 }' "$here/go/coredns/go.mod")
kind_src=$(cd "$here/go/kind" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' sigs.k8s.io/kind)
k8s_src=$(cd "$here/go/kubeadm" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' k8s.io/kubernetes)
[ -d "$kind_src/images/base/files" ] || die "no images/base/files in $kind_src"
# kubeadm pins the CoreDNS version it deploys; ours must be that one.
want=$(sed -n 's/^\s*CoreDNSVersion = "\(.*\)"/\1/p' "$k8s_src/cmd/kubeadm/app/constants/constants.go")
[ "$want" = "$coredns_version" ] || die "kubeadm $k8s_version deploys CoreDNS $want, e2e/kind/go/coredns pins $coredns_version"
pause_tag=$(sed -n 's/^TAG ?= //p' "$k8s_src/build/pause/Makefile")
REPO=wsrelay.local/kind

mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# kind's base image packages (images/base/Dockerfile) that a node here needs, and the two it
# builds from source instead (runc, CNI plugins), from Debian.
packages=(systemd systemd-sysv dbus util-linux mount kmod procps ca-certificates
	iptables nftables iproute2 conntrack ethtool libseccomp2 jq runc containernetworking-plugins)
base_key=$(printf '%s\n' "$suite" "$mirror" "${packages[@]}" | sha256sum | cut -c1-12)
base_tar=$kind_cache/rootfs/$suite-$base_key.tar

# Everything the node image is made of: a change to any of them makes a new image.
node_key=$( {
	echo "$base_key $k8s $etcd $containerd $kubeadm_dir $crictl_dir $coredns_dir $kind_src $pause_tag"
	cat "$0" "$root/images/oci.py"
	cat "$k8s_src/build/pause/linux/pause.c"
} | sha256sum | cut -c1-12)
image=localhost/wsrelay/kind-node:$k8s_version-$node_key
if podman image exists "$image"; then
	log "$image is up to date"
	echo "$image"
	exit 0
fi
log "building $image"

mkdir -p "$kind_cache/rootfs" "$kind_cache/tmp"
work=$(mktemp -d "$kind_cache/tmp/node-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# --- Debian root filesystem (cached) -------------------------------------------------------
if [ ! -f "$base_tar" ]; then
	log "debootstrap $suite (${packages[*]})"
	t=$SECONDS
	debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
		"$suite" "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		{ tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
	rm -rf "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/lib/apt/lists/"*
	tar -C "$work/base" --numeric-owner -cf "$base_tar.tmp" .
	mv "$base_tar.tmp" "$base_tar"
	rm -rf "$work/base"
	find "$kind_cache/rootfs" -name "$suite-*.tar" ! -name "${base_tar##*/}" -delete
	log "root filesystem in $((SECONDS - t))s ($(du -h "$base_tar" | cut -f1))"
fi
fs=$work/rootfs
mkdir -p "$fs"
tar -C "$fs" --numeric-owner -xf "$base_tar"

# --- kind's base image files and set-up (images/base/Dockerfile) --------------------------
kf=$kind_src/images/base/files
install -m 0755 "$kf"/usr/local/bin/* "$fs/usr/local/bin/"
mkdir -p "$fs/kind/bin" "$fs/kind/manifests" "$fs/etc/containerd" "$fs/etc/systemd/system/kubelet.service.d" "$fs/etc/kubernetes/manifests"
install -m 0644 "$kf"/kind/README.txt "$fs/kind/"
install -m 0755 "$kf"/kind/bin/* "$fs/kind/bin/"
install -m 0644 "$kf"/etc/crictl.yaml "$fs/etc/"
install -m 0644 "$kf"/etc/default/kubelet "$fs/etc/default/"
install -m 0644 "$kf"/etc/sysctl.d/* "$fs/etc/sysctl.d/"
install -m 0644 "$kf"/etc/systemd/system/*.service "$kf"/etc/systemd/system/*.slice "$fs/etc/systemd/system/"
install -m 0644 "$kf"/etc/systemd/system/kubelet.service.d/* "$fs/etc/systemd/system/kubelet.service.d/"
# kind's containerd configuration, with the sandbox image built here and, because this
# machine withholds CAP_SYS_RESOURCE (a process cannot lower its oom_score_adj, and the
# kubelet asks -998 for pod sandboxes), container scores clamped to containerd's own.
sed -e "s#sandbox_image = .*#sandbox_image = \"$REPO/pause:$pause_tag\"#" \
	-e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' \
	"$kf/etc/containerd/config.toml" >"$fs/etc/containerd/config.toml"
grep -q "sandbox_image = \"$REPO/pause:$pause_tag\"" "$fs/etc/containerd/config.toml" || die "kind's containerd config changed: no sandbox_image to set"
grep -q 'restrict_oom_score_adj = true' "$fs/etc/containerd/config.toml" || die "kind's containerd config changed: no restrict_oom_score_adj"
(
	cd "$fs"
	find lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete
	rm -f lib/systemd/system/multi-user.target.wants/* etc/systemd/system/*.wants/* \
		lib/systemd/system/local-fs.target.wants/* lib/systemd/system/sockets.target.wants/*udev* \
		lib/systemd/system/sockets.target.wants/*initctl* lib/systemd/system/basic.target.wants/*
)
echo "ReadKMsg=no" >>"$fs/etc/systemd/journald.conf"
chroot "$fs" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
chroot "$fs" systemctl mask systemd-binfmt.service >/dev/null 2>&1
# kind's node image puts runc in /usr/local/sbin and the CNI plugins in /opt/cni/bin.
ln -s /usr/sbin/runc "$fs/usr/local/sbin/runc"
mkdir -p "$fs/opt/cni/bin"
for p in host-local loopback ptp portmap bridge; do ln -s "/usr/lib/cni/$p" "$fs/opt/cni/bin/$p"; done

# --- the pinned binaries --------------------------------------------------------------------
install -m 0755 "$containerd"/{containerd,containerd-shim-runc-v2,ctr} "$fs/usr/local/bin/"
install -m 0755 "$k8s/kubelet" "$k8s/kubectl" "$kubeadm_dir/kubeadm" "$fs/usr/bin/"
install -m 0755 "$crictl_dir/crictl" "$fs/usr/local/bin/"
# containerd's default OCI spec, with kind's product-files hook and no rlimits (as kind).
"$containerd/ctr" oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
spec.setdefault("hooks", {}).setdefault("createContainer", []).append({"path": "/kind/bin/mount-product-files.sh"})
spec["process"].pop("rlimits", None)
json.dump(spec, sys.stdout, indent=4)' >"$fs/etc/containerd/cri-base.json"
echo "$k8s_version" >"$fs/kind/version"

# --- CNI and storage manifests kind applies ---------------------------------------------------
# The node's pod range is the first /24 of kind's podSubnet (10.244.0.0/16, set explicitly in
# cluster.yaml): what the controller-manager gives the one node, and what kindnetd would write.
# Pod traffic leaving the node is masqueraded to the node's address, as kindnetd does, so the
# host (which has no route to 10.244.0.0/16) answers the node, never its default route.
mkdir -p "$fs/etc/cni/net.d"
cat >"$fs/etc/cni/net.d/10-wsrelay-ptp.conflist" <<'CNI'
{
  "cniVersion": "0.4.0",
  "name": "wsrelay-kind",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{ "dst": "0.0.0.0/0" }],
        "ranges": [[{ "subnet": "10.244.0.0/24" }]]
      },
      "mtu": 1500
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
CNI
# kind applies this file with `kubectl create`; the network itself is the file above, so
# this only records it in the cluster.
cat >"$fs/kind/manifests/default-cni.yaml" <<'YAML'
# wsrelay's offline kind node image has no kindnetd (its image cannot be pulled here): the
# node carries a static CNI configuration instead (ptp + host-local on 10.244.0.0/24, one
# node only). Recorded here for whoever looks; see e2e/kind/README.md in the wsrelay repo.
apiVersion: v1
kind: ConfigMap
metadata:
  name: wsrelay-kind-cni
  namespace: kube-system
data:
  source: /etc/cni/net.d/10-wsrelay-ptp.conflist on the node (e2e/kind/node-image.sh)
YAML
cat >"$fs/kind/manifests/default-storage.yaml" <<'YAML'
# No dynamic provisioner in wsrelay's offline kind node image (local-path-provisioner's
# image cannot be pulled here, and the e2e suites claim no volumes): a default class whose
# claims wait for a PersistentVolume made by hand.
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
YAML

# --- the images kubeadm runs -----------------------------------------------------------------
imgs=$work/images
mkdir -p "$imgs"
oci() { SOURCE_DATE_EPOCH=0 python3 "$root/images/oci.py" --user 0:0 "$@" 2>/dev/null; }
for c in kube-apiserver kube-controller-manager kube-scheduler; do
	oci --out "$imgs/$c.tar" --name "$REPO/$c:$k8s_version" --file "/usr/local/bin/$c=$k8s/$c" --entrypoint "/usr/local/bin/$c"
done
# kube-proxy (nftables mode, see cluster.yaml) runs nft: Debian's, with the libraries it
# loads, from the root filesystem above.
proxy_files=(--file "/usr/local/bin/kube-proxy=$k8s/kube-proxy" --file "/usr/local/bin/nft=$fs/usr/sbin/nft")
while read -r lib; do
	proxy_files+=(--file "$lib=$fs$lib")
done < <(chroot "$fs" ldd /usr/sbin/nft | grep -o '/[^ ]*' | sort -u)
oci --out "$imgs/kube-proxy.tar" --name "$REPO/kube-proxy:$k8s_version" "${proxy_files[@]}" --entrypoint /usr/local/bin/kube-proxy
oci --out "$imgs/etcd.tar" --name "$REPO/etcd:$etcd_version" --file "/usr/local/bin/etcd=$etcd/etcd" --entrypoint /usr/local/bin/etcd
oci --out "$imgs/coredns.tar" --name "$REPO/coredns:$coredns_version" --file "/coredns=$coredns_dir/coredns" --entrypoint /coredns
musl-gcc -Os -Wall -Werror -static -DVERSION="v$pause_tag-wsrelay" -o "$work/pause" "$k8s_src/build/pause/linux/pause.c"
oci --out "$imgs/pause.tar" --name "$REPO/pause:$pause_tag" --file "/pause=$work/pause" --entrypoint /pause --user 65535:65535

# Into the node's containerd store (/var/lib/containerd), by the containerd it will run: the
# same import `kind load image-archive` does, in a mount namespace of its own.
cat >"$work/containerd.toml" <<TOML
version = 2
root = "$fs/var/lib/containerd"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
TOML
unshare --mount --propagation private bash -euo pipefail -c '
	work=$1 bin=$2
	"$bin/containerd" --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
	pid=$!
	for _ in $(seq 100); do [ -S "$work/containerd.sock" ] && break; sleep 0.1; done
	for a in "$work"/images/*.tar; do
		"$bin/ctr" -a "$work/containerd.sock" -n k8s.io images import --all-platforms --snapshotter overlayfs "$a" 2>&1 >/dev/null | { grep -v "DEPRECATION: The support for cgroup v1" || true; } >&2
	done
	"$bin/ctr" -a "$work/containerd.sock" -n k8s.io images ls -q
	kill "$pid"; wait "$pid" || true
' _ "$work" "$containerd" | sed 's/^/[node-image] preloaded /' >&2
rm -rf "$work/containerd-state"

# --- into podman ----------------------------------------------------------------------------
tar -C "$fs" --numeric-owner -c . | podman import \
	--change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
	--change 'STOPSIGNAL SIGRTMIN+3' --change 'ENV container=docker' \
	- "$image" >/dev/null 2>"$work/podman-import.log" || { cat "$work/podman-import.log" >&2; die "podman import failed"; }
# Older builds of the node image go. (Not a grep pipeline: under pipefail, a grep that
# matches nothing, as on the first build, would end the script with status 1, silently.)
for old in $(podman images --format '{{.Repository}}:{{.Tag}}'); do
	if [[ $old == localhost/wsrelay/kind-node:* && $old != "$image" ]]; then
		podman rmi "$old" >/dev/null 2>&1 || true
	fi
done
log "built $image in $((SECONDS - start))s"
echo "$image"
