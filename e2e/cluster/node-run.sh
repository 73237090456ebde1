#!/usr/bin/env bash
# The node's supervisor: node-up.sh starts it as pid 1 of a pid namespace of its own, inside
# the node's network namespace and a private mount namespace. Everything the node runs
# (containerd, its shims, every container, kubelet, kube-proxy, the in-node socat ends) is
# started from here and so lives in that pid namespace: when this process dies the kernel
# kills all of them, and the mounts they made die with the mount namespace.
#
# usage: node-run.sh NODE_DIR BIN_DIR LOG_DIR NODE_IP     (never by hand: see node-up.sh)
set -euo pipefail
node=$1 bin=$2 logs=$3 node_ip=$4
export PATH=$bin:$PATH

log() { printf '[node-run] %s %s\n' "$(date -u +%T)" "$*" >>"$logs/node-run.log"; }

# Host paths that containerd, its shims and kubelet write to whatever they are told
# (/run/containerd/s for shim sockets, /run/netns for pod netns, /var/lib/cni for the CNI
# cache, /var/log/containers for log links): a tmpfs on /run and an overlay on /var whose
# upper layer is in NODE_DIR keep all of it out of the host's file system. (NODE_DIR
# must not be under /var for that reason.)
mount -t tmpfs -o mode=755 wsrelay-node-run /run
mkdir -p "$node/var/upper" "$node/var/work"
mount -t overlay wsrelay-node-var -o "lowerdir=/var,upperdir=$node/var/upper,workdir=$node/var/work" /var

# Per network namespace: the node routes between its pods and the host, and bridged pod
# traffic goes through netfilter so a Service reply from a pod on the same bridge is
# un-NATed (kube-proxy needs this).
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1

# run NAME COMMAND...: keeps COMMAND running, restarting it a second after it exits (kubelet
# exits on some errors by design and expects to be restarted).
run() {
	local name=$1
	shift
	(
		while :; do
			log "starting $name"
			"$@" >>"$logs/node-$name.log" 2>&1 </dev/null || true
			log "$name exited"
			sleep 1
		done
	) &
}

# In-node ends of the loopback bridges (node-up.sh starts the host ends): the API server and
# NATS on the node's address, through unix sockets, which no network namespace confines.
run socat-apiserver socat "TCP-LISTEN:6443,bind=$node_ip,fork,reuseaddr" "UNIX-CONNECT:$node/apiserver.sock"
run socat-nats socat "TCP-LISTEN:4222,bind=$node_ip,fork,reuseaddr" "UNIX-CONNECT:$node/nats.sock"

run containerd containerd --config "$node/containerd.toml"
until ctr --address "$node/containerd.sock" version >/dev/null 2>&1; do sleep 0.2; done
log "containerd ready"

run kubelet kubelet --config "$node/kubelet.yaml" --kubeconfig "$node/kubelet.kubeconfig" \
	--root-dir "$node/kubelet" --hostname-override wsrelay-node --node-ip "$node_ip" --v 1
run kube-proxy kube-proxy --config "$node/kube-proxy.yaml" --v 1

# pid 1 of a pid namespace gets no default signal actions; stop on TERM/INT ourselves, which
# takes the whole namespace down.
trap 'log "stopping"; exit 0' TERM INT
wait
