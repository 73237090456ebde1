# Sourced by e2e/kind/node-image.sh and e2e/kind/run.sh: a podman set up for kind on this
# kind of machine, without touching the host's own podman configuration.
#
# - Configuration, storage and network definitions live under $WSRELAY_CACHE/kind/podman
#   (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF; kind runs podman with our environment).
# - runc, not crun: crun refuses this host ("cgroups in hybrid mode not supported").
# - cgroupfs manager and file event logging: there is no systemd as PID 1 here.
# - default_ulimits below this machine's hard limits (RLIMIT_NOFILE hard 20000; a high
#   RLIMIT_NPROC is refused): podman's defaults make runc fail with "setrlimit ... Operation
#   not permitted", and kind passes no ulimit flags.
# - The kind network (KIND_EXPERIMENTAL_PODMAN_NETWORK) is made here, not by kind: a bridge
#   the script creates with the host's address on it, and a CNI bridge without isGateway
#   and without masquerading, because the CNI bridge plugin turns on the host's
#   net.ipv4.ip_forward for a gateway bridge; here the host keeps forwarding off, so nothing
#   in the kind node can reach past this machine. No port is published either (kind's
#   127.0.0.1 API server mapping would need iptables rules on the host): the kubeconfig
#   points at the node's address on this bridge instead.
kind_cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}/kind
podman_dir=$kind_cache/podman
KIND_NET=${KIND_NET:-wsrelay-kind}
KIND_BRIDGE=${KIND_BRIDGE:-wsrelay-kind0}
# A /24 nothing else on this machine uses (the local node has 10.202.0.0/16, the e2e test
# hosts 10.201.0.0/16, Services 10.96.0.0/16).
KIND_SUBNET=${KIND_SUBNET:-10.203.0}
# The node has no default route, only this one (to the host's end of the bridge, which
# forwards nothing): the Service range (cluster.yaml serviceSubnet). Processes on the node
# (the API server reaching the metrics APIService, ...) dial ClusterIPs, and a connect() to
# an address without a route fails before kube-proxy's DNAT can apply.
KIND_SERVICE_SUBNET=10.96.0.0/16

podman_setup() {
	mkdir -p "$podman_dir/cni" "$podman_dir/storage"
	cat >"$podman_dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=19999:19999", "nproc=4096:4096"]
# Not the host's resolver (which the node could not reach anyway: no forwarding): the host's
# end of the kind bridge, where nothing answers, so lookups of outside names fail at once.
dns_servers = ["$KIND_SUBNET.1"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$podman_dir/events.log"
[network]
network_backend = "cni"
network_config_dir = "$podman_dir/cni"
cni_plugin_dirs = ["/usr/lib/cni"]
CONF
	cat >"$podman_dir/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$podman_dir/storage"
runroot = "/run/wsrelay-kind-podman"
CONF
	cat >"$podman_dir/cni/$KIND_NET.conflist" <<CONF
{
  "cniVersion": "0.4.0",
  "name": "$KIND_NET",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$KIND_BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$KIND_SUBNET.0/24", "gateway": "$KIND_SUBNET.1" }]],
        "routes": [{ "dst": "$KIND_SERVICE_SUBNET" }]
      }
    }
  ]
}
CONF
	export CONTAINERS_CONF=$podman_dir/containers.conf
	export CONTAINERS_STORAGE_CONF=$podman_dir/storage.conf
	export KIND_EXPERIMENTAL_PROVIDER=podman
	export KIND_EXPERIMENTAL_PODMAN_NETWORK=$KIND_NET
}

# The host end of the kind network: the bridge with $KIND_SUBNET.1 on it.
bridge_up() {
	if ! ip link show "$KIND_BRIDGE" >/dev/null 2>&1; then
		ip link add "$KIND_BRIDGE" type bridge
	fi
	ip addr replace "$KIND_SUBNET.1/24" dev "$KIND_BRIDGE"
	ip link set "$KIND_BRIDGE" up
}

bridge_down() {
	if ip link show "$KIND_BRIDGE" >/dev/null 2>&1; then ip link del "$KIND_BRIDGE"; fi
	# What podman's CNI plugins kept about the kind network on this machine (host-local's
	# leases; libcni's results, removed with the node): the directories go when nothing else
	# keeps files in them.
	rm -rf "/var/lib/cni/networks/$KIND_NET"
	rmdir /var/lib/cni/networks /var/lib/cni/results /var/lib/cni 2>/dev/null || true
}
