#!/usr/bin/env bash
# Joins a real node to the running local control plane (up.sh) and waits until it runs pods:
# containerd, runc, the CNI bridge, kubelet and kube-proxy in a network namespace of their
# own (wsrelay-node), with pods on 10.202.64.0/18 that the host reaches by route. Ends with
# node-check.sh (a pod, its IP, a Service from the host and from a pod, the API server from
# a pod) unless NODE_CHECK=0.
#
#   host netns                                  netns wsrelay-node
#   127.0.0.1:6443 apiserver  <- unix socket ->  10.202.0.2:6443 (socat)   kubelet, kube-proxy
#   127.0.0.1:14222 NATS      <- unix socket ->  10.202.0.2:4222 (socat)   containerd, pods
#   wsrelay-nodeh 10.202.0.1/24  <--- veth --->  eth0 10.202.0.2/24, cni0 10.202.64.1/18
#   routes: 10.202.64.0/18 and 10.96.0.0/16 via 10.202.0.2; unreachable 10.202.0.0/16
# Nothing is routed anywhere else: the node netns has no default route and the host does not
# forward, so no pod packet can leave the machine.
#
# Images: every *.tar OCI archive in NODE_IMAGES_DIR (unset: the directory images/build.sh
# prints; empty: none) is imported and pinned, plus the node's own nodecheck image. The
# sandbox (pause) image is NODE_PAUSE_IMAGE, else the imported image named */pause:*, else
# nodecheck.
#
# Safe to run again: what is up is left alone. Stop with node-down.sh (down.sh calls it).
# usage: node-up.sh BIN_DIR     (BIN_DIR from tools.sh)
set -euo pipefail

bin=$1
source "$(dirname "$0")/lib.sh"
node=$state/node
pki=$state/pki
export KUBECONFIG=$state/kubeconfig PATH=$bin:$PATH
NETNS=wsrelay-node
HOST_IF=wsrelay-nodeh
HOST_IP=10.202.0.1
NODE_IP=10.202.0.2
POD_CIDR=10.202.64.0/18
SERVICE_CIDR=10.96.0.0/16
APISERVER_PORT=${APISERVER_PORT:-6443}
NATS_PORT=${NATS_PORT:-14222}
start_time=$SECONDS

log() { printf '[node-up] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespace, mounts, cgroups)"
case $state/ in /var/*) die "the cluster state ($state) must not be under /var: the node overlays /var" ;; esac
running_pid kube-apiserver >/dev/null || die "the control plane is not running: run up.sh first"

"$here/deps.sh" node
# containerd and nodecheck are built on demand, only for the node.
"$here/tools.sh" containerd nodecheck >/dev/null
# Adds the node's certificates and the node address to the API server's SANs.
"$here/pki.sh" "$pki"
mkdir -p "$state/pids" "$state/logs"
# Configuration is written here first, and moved in only where it changed: a rewritten file
# would restart kube-proxy (it exits when its file changes) and reload CNI for nothing.
new=$(mktemp -d "$state/node-config.XXXXXX")
trap 'rm -rf "$new"' EXIT

# --- configuration ------------------------------------------------------------------------
kubeconfig "$new/kubelet.kubeconfig" "https://$NODE_IP:6443" system:node:wsrelay-node node-kubelet
kubeconfig "$new/kube-proxy.kubeconfig" "https://$NODE_IP:6443" system:kube-proxy node-kube-proxy

# The node's own image: nodecheck (node-check.sh's server and clients, and the fallback
# pause), a FROM-scratch OCI archive written here so the node needs nothing else.
NODECHECK_IMAGE=wsrelay.local/nodecheck:$(sha256sum "$bin/nodecheck" | cut -c1-12)
oci_archive() { # name binary archive
	local d
	d=$(mktemp -d)
	mkdir -p "$d/rootfs" "$d/blobs/sha256"
	cp "$2" "$d/rootfs/nodecheck"
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$d/rootfs" -cf "$d/layer" nodecheck
	blob() { # file -> "sha256:HEX SIZE", moved into blobs/ (before the line: read does not wait)
		local sum size
		sum=$(sha256sum "$1" | cut -d' ' -f1)
		size=$(stat -c %s "$1")
		mv "$1" "$d/blobs/sha256/$sum"
		echo "sha256:$sum $size"
	}
	read -r layer layer_size < <(blob "$d/layer")
	printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/nodecheck"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' "$layer" >"$d/config"
	read -r config config_size < <(blob "$d/config")
	printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
		"$config" "$config_size" "$layer" "$layer_size" >"$d/manifest"
	read -r manifest manifest_size < <(blob "$d/manifest")
	printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
		"$manifest" "$manifest_size" "$1" "${1##*:}" >"$d/index.json"
	echo '{"imageLayoutVersion":"1.0.0"}' >"$d/oci-layout"
	tar -C "$d" -cf "$3" oci-layout index.json blobs
	rm -rf "$d"
}

archives=("$node/images/nodecheck.tar")
if [ -z "${NODE_IMAGES_DIR+set}" ] && [ -x "$root/images/build.sh" ]; then
	log "building the project's images (images/build.sh)"
	NODE_IMAGES_DIR=$("$root/images/build.sh")
fi
if [ -n "${NODE_IMAGES_DIR:-}" ]; then
	for a in "$NODE_IMAGES_DIR"/*.tar; do [ -f "$a" ] && archives+=("$a"); done
fi
# The image names an OCI archive declares (its index's io.containerd.image.name annotations).
image_names() { tar -xOf "$1" index.json | grep -o '"io.containerd.image.name" *: *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/'; }
pause=${NODE_PAUSE_IMAGE:-}
if [ -z "$pause" ]; then
	for a in "${archives[@]:1}"; do
		pause=$(image_names "$a" | grep -m1 '/pause:' || true)
		[ -z "$pause" ] || break
	done
fi
pause=${pause:-$NODECHECK_IMAGE}

# Snapshotter: overlayfs when this file system takes an overlay mount, else native (copies).
snapshotter=native
probe=$(mktemp -d "$new/overlay-probe.XXXXXX")
mkdir -p "$probe"/{l,u,w,m}
if unshare --mount sh -c "mount -t overlay probe -o lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w $probe/m" 2>/dev/null; then
	snapshotter=overlayfs
fi
rm -rf "$probe"

cat >"$new/10-wsrelay.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "wsrelay",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
CNI

cat >"$new/containerd.toml" <<TOML
version = 4
root = "$node/containerd/root"
# Not the host's /etc/containerd/conf.d.
imports = []
state = "$node/containerd/state"
# Plugins that would write outside the state directories, or that the node does not use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.image-verifier.v1.bindir", "io.containerd.nri.v1.nri", "io.containerd.internal.v1.tracing"]

[plugins."io.containerd.server.v1.grpc"]
  address = "$node/containerd.sock"
[plugins."io.containerd.server.v1.ttrpc"]
  address = "$node/containerd.sock.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "$snapshotter"
  # No registry is reachable: every image is imported by node-up.sh.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$pause"

[plugins."io.containerd.cri.v1.runtime"]
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which this machine withholds;
  # clamp the kubelet's negative values (pod sandboxes: -998) to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$node/cni/net.d"
TOML

cat >"$new/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine is cgroup v1 (hybrid); the kubelet refuses v1 unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$node/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
tlsCertFile: $pki/node-kubelet-serving.crt
tlsPrivateKeyFile: $pki/node-kubelet-serving.key
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $pki/ca.crt }
authorization:
  mode: Webhook
podCIDR: $POD_CIDR
maxPods: 110
podLogsDir: $node/pod-logs
# No cluster DNS; pods get an empty resolv.conf instead of the host's.
resolvConf: ""
# The disk is shared with everything else on the machine: never evict, never collect images
# (there is no registry to pull them back from).
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML

cat >"$new/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $node/kube-proxy.kubeconfig
hostnameOverride: wsrelay-node
mode: nftables
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The conntrack table size is global (init netns only): leave the kernel's values alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML

# A running node does not take new configuration (containerd, kubelet read it once): start
# it again, from nothing.
changed=
dest() { case $1 in *.conflist) echo "$node/cni/net.d/${1##*/}" ;; *) echo "$node/${1##*/}" ;; esac; }
for f in "$new"/*; do cmp -s "$f" "$(dest "$f")" || changed+=" ${f##*/}"; done
if [ -n "$changed" ] && running_pid node unshare >/dev/null; then
	log "configuration changed ($changed ): restarting the node"
	"$here/node-down.sh"
fi
mkdir -p "$node/cni/net.d" "$node/images"
for f in "$new"/*; do cmp -s "$f" "$(dest "$f")" || mv "$f" "$(dest "$f")"; done
oci_archive "$NODECHECK_IMAGE" "$bin/nodecheck" "$node/images/nodecheck.tar"
echo "$NODECHECK_IMAGE" >"$node/nodecheck-image"

# --- network ---------------------------------------------------------------------------
if ! ip netns list | grep -qx "$NETNS\( (id: [0-9]*)\)\?"; then
	log "creating network namespace $NETNS"
	ip netns add "$NETNS"
fi
nsx() { ip netns exec "$NETNS" "$@"; }
if ! ip link show "$HOST_IF" >/dev/null 2>&1; then
	ip link add "$HOST_IF" type veth peer name eth0 netns "$NETNS"
fi
ip addr replace "$HOST_IP/24" dev "$HOST_IF"
ip link set "$HOST_IF" up
nsx ip addr replace "$NODE_IP/24" dev eth0
nsx ip link set eth0 up
nsx ip link set lo up
# Say so explicitly: nothing but the host and the pods is reachable from the node.
nsx ip route replace unreachable default
# The safety net first, then the two ranges the node serves (more specific, so they win).
ip route replace unreachable 10.202.0.0/16
ip route replace "$POD_CIDR" via "$NODE_IP" dev "$HOST_IF"
ip route replace "$SERVICE_CIDR" via "$NODE_IP" dev "$HOST_IF"

# --- host ends of the loopback bridges ----------------------------------------------------
start node-socat-apiserver socat "UNIX-LISTEN:$node/apiserver.sock,fork,unlink-early" "TCP:127.0.0.1:$APISERVER_PORT"
start node-socat-nats socat "UNIX-LISTEN:$node/nats.sock,fork,unlink-early" "TCP:127.0.0.1:$NATS_PORT"

# --- the node ------------------------------------------------------------------------------
if ! running_pid node unshare >/dev/null; then
	log "starting the node (containerd, kubelet, kube-proxy) in $NETNS"
	# nsenter --net, not `ip netns exec`: that one remounts /sys, hiding the cgroup
	# hierarchies kubelet and runc need. --kill-child: if this unshare dies, so does the
	# namespace's pid 1, and with it every process of the node.
	setsid nsenter --net="/run/netns/$NETNS" -- \
		unshare --mount --propagation private --pid --fork --mount-proc --kill-child=SIGKILL -- \
		bash "$here/node-run.sh" "$node" "$bin" "$state/logs" "$NODE_IP" \
		>>"$state/logs/node.log" 2>&1 </dev/null &
	pid=$!
	echo $pid >"$state/pids/node.pid"
	# Record node-run.sh's pid and mount namespaces: node-down.sh finds every process of the
	# node by them.
	child=
	for _ in $(seq 1 100); do
		child=$(awk '{ print $1 }' "/proc/$pid/task/$pid/children" 2>/dev/null || true)
		[ -z "$child" ] || break
		sleep 0.1
	done
	[ -n "$child" ] || die "the node did not start; see $state/logs/node.log"
	readlink "/proc/$child/ns/pid" >"$node/pidns"
	readlink "/proc/$child/ns/mnt" >"$node/mntns"
fi

# wait_until what timeout_seconds command...
wait_until() {
	local what=$1 limit=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $deadline ]; then
			log "$what not ready after ${limit}s; last log lines:"
			tail -n 30 "$state/logs/node-$what.log" "$state/logs/node-run.log" >&2 || true
			exit 1
		fi
		running_pid node unshare >/dev/null || { log "the node stopped; see $state/logs/node*.log"; tail -n 20 "$state/logs/node.log" >&2; exit 1; }
		sleep 0.5
	done
	log "$what ready ($((SECONDS - start_time))s)"
}
ctrd() { ctr --address "$node/containerd.sock" --namespace k8s.io "$@"; }
wait_until containerd 60 ctrd version

# Import and pin (kubelet's image GC never removes a pinned image; there is no registry).
for a in "${archives[@]}"; do
	# (ctr warns on every call that cgroup v1 is deprecated: known, filtered out.)
	ctrd images import --snapshotter "$snapshotter" --platform linux/amd64 \
		--label io.cri-containerd.pinned=pinned "$a" 2>&1 >/dev/null |
		{ grep -v 'support for cgroup v1 is deprecated' || true; } >&2
	for name in $(image_names "$a"); do
		# (Again: an image imported before keeps its old labels.)
		ctrd images label "$name" io.cri-containerd.pinned=pinned 2>&1 >/dev/null |
			{ grep -v 'support for cgroup v1 is deprecated' || true; } >&2
		log "image $name"
	done
done

# The endpoint reconciler is off (the API server's own address is loopback): point the
# `kubernetes` Service at the node's end of the API server bridge, so pods reach it on
# 10.96.0.1:443 through kube-proxy.
# (kubectl's deprecation warning for v1 Endpoints is filtered out: both objects are meant.)
kubectl apply -f - 2>&1 >/dev/null <<YAML | { grep -v 'v1 Endpoints is deprecated' || true; } >&2
apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: { endpointslice.kubernetes.io/skip-mirror: "true" }
subsets:
- addresses: [{ ip: $NODE_IP }]
  ports: [{ name: https, port: 6443, protocol: TCP }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: node-up.sh
addressType: IPv4
endpoints:
- addresses: [$NODE_IP]
  conditions: { ready: true }
ports:
- { name: https, port: 6443, protocol: TCP }
YAML

node_ready() { [ "$(kubectl get node wsrelay-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_until kubelet 180 node_ready
log "node wsrelay-node Ready after $((SECONDS - start_time))s"

if [ "${NODE_CHECK:-1}" != 0 ]; then
	"$here/node-check.sh" "$bin"
fi
# Where pods find NATS (the host's 127.0.0.1:$NATS_PORT, bridged into the node).
echo "nats://$NODE_IP:4222" >"$node/nats-url"
log "ready in $((SECONDS - start_time))s: node wsrelay-node ($NODE_IP), pods on $POD_CIDR, NATS for pods at $(cat "$node/nats-url")"
