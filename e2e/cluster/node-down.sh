#!/usr/bin/env bash
# Removes every trace of the node node-up.sh started, and only that: its processes (node-run.sh's
# pid namespace: containerd, shims, containers, kubelet, kube-proxy), with them its mount
# namespace and every mount in it, the network namespace and veth, the host routes, the
# cgroups kubelet and runc made (kubepods under every hierarchy), the socat bridges, the
# Node object, and $state/node. The control plane keeps running (down.sh stops it after
# calling this). Safe to run when there is no node.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
NETNS=wsrelay-node
HOST_IF=wsrelay-nodeh
node=$state/node

log() { printf '[node-down] %s\n' "$*" >&2; }

# The pid and mount namespaces node-up.sh recorded for node-run.sh.
pidns=$(cat "$node/pidns" 2>/dev/null || true)
mntns=$(cat "$node/mntns" 2>/dev/null || true)
# Never the host's own (a wrong record would name every process on the machine).
[ "$pidns" != "$(readlink /proc/1/ns/pid)" ] && [ "$pidns" != "$(readlink /proc/self/ns/pid)" ] || pidns=
[ "$mntns" != "$(readlink /proc/1/ns/mnt)" ] && [ "$mntns" != "$(readlink /proc/self/ns/mnt)" ] || mntns=

# Processes of the node: in its pid or mount namespace, in its network namespace, or in a
# cgroup kubelet made. Nested pid namespaces (containers) show as their own, so the cgroups
# and the netns catch them.
node_pids() {
	local p ns
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		ns=$(readlink "/proc/$p/ns/pid" 2>/dev/null) || continue
		if [ -n "$pidns" ] && [ "$ns" = "$pidns" ]; then echo "$p"; continue; fi
		if [ -n "$mntns" ] && [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$mntns" ]; then echo "$p"; continue; fi
	done
	[ -e "/run/netns/$NETNS" ] && ip netns pids "$NETNS" 2>/dev/null
	cgroup_mounts | while read -r mp; do
		[ -d "$mp/kubepods" ] && find "$mp/kubepods" -name cgroup.procs -exec cat {} + 2>/dev/null
	done
	return 0
}
# Every mounted cgroup hierarchy (v1 controllers, name=systemd, the unified v2 one).
cgroup_mounts() { awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo; }

if pid=$(running_pid node unshare); then
	# --kill-child: the namespace's pid 1 dies with it, and the kernel kills the rest.
	log "stopping the node (pid $pid)"
	kill -KILL "$pid" 2>/dev/null || true
fi
for _ in $(seq 1 100); do
	pids=$(node_pids | sort -un)
	[ -z "$pids" ] && break
	# shellcheck disable=SC2086 # one pid per word
	kill -KILL $pids 2>/dev/null || true
	sleep 0.1
done
[ -z "$(node_pids)" ] || { log "processes of the node still alive: $(node_pids | sort -un | tr '\n' ' ')"; exit 1; }
rm -f "$state/pids/node.pid"

for name in node-socat-apiserver node-socat-nats; do
	if pid=$(running_pid "$name" socat); then
		kill -TERM "$pid" 2>/dev/null || true
	fi
	rm -f "$state/pids/$name.pid"
done

# The netns goes with its veth (the host end too) and the routes through it.
if [ -e "/run/netns/$NETNS" ]; then
	log "removing network namespace $NETNS"
	ip netns del "$NETNS"
fi
ip link del "$HOST_IF" 2>/dev/null || true
ip route del 10.202.64.0/18 2>/dev/null || true
ip route del 10.96.0.0/16 2>/dev/null || true
# While the control plane stays up, its Service range stays unreachable (as up.sh leaves it).
if [ -d "$state" ]; then ip route replace unreachable 10.96.0.0/16; fi
ip route del unreachable 10.202.0.0/16 2>/dev/null || true

# Deepest first; a cgroup is removable only once its last process is gone, which the kernel
# may take a moment to notice.
for mp in $(cgroup_mounts); do
	[ -d "$mp/kubepods" ] || continue
	for _ in $(seq 1 50); do
		find "$mp/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true
		[ -d "$mp/kubepods" ] || break
		sleep 0.1
	done
	[ ! -d "$mp/kubepods" ] || { log "cannot remove $mp/kubepods"; exit 1; }
done

# With the control plane still up: no Node left NotReady, no `kubernetes` endpoints pointing
# at a gone address.
if running_pid kube-apiserver >/dev/null && [ -f "$state/kubeconfig" ]; then
	export KUBECONFIG=$state/kubeconfig
	kubectl delete node wsrelay-node --ignore-not-found --wait=false >/dev/null 2>&1 || true
	# Its pods would wait for the pod GC's 40 s quarantine; they are gone already.
	kubectl delete pods --all-namespaces --field-selector spec.nodeName=wsrelay-node \
		--force --grace-period=0 >/dev/null 2>&1 || true
	kubectl -n default delete endpointslice kubernetes --ignore-not-found >/dev/null 2>&1 || true
	kubectl -n default delete endpoints kubernetes --ignore-not-found >/dev/null 2>&1 || true
fi

rm -rf "$node"
log "removed the node"
