#!/usr/bin/env bash
# Starts the local test ground on loopback and waits until it is ready:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and a nats-server with
#   JetStream and a WebSocket listener.
# Leaves .cluster/kubeconfig, .cluster/nats-url and .cluster/nats-ws-url; logs in .cluster/logs/.
# Safe to run again: components already running are left alone, stopped ones are started.
#
# usage: up.sh BIN_DIR     (BIN_DIR from tools.sh)
set -euo pipefail

bin=$1
source "$(dirname "$0")/lib.sh"
pki=$state/pki
mkdir -p "$state/logs" "$state/pids" "$state/etcd" "$state/nats"

# Ports, all on 127.0.0.1; override if something else holds them.
ETCD_PORT=${ETCD_PORT:-23790}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-23800}
APISERVER_PORT=${APISERVER_PORT:-6443}
KCM_PORT=${KCM_PORT:-10257}
SCHEDULER_PORT=${SCHEDULER_PORT:-10259}
NATS_PORT=${NATS_PORT:-14222}
NATS_WS_PORT=${NATS_WS_PORT:-14280}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-18222}
SERVICE_CIDR=10.96.0.0/16
# How often the HPA controller re-evaluates; short so tests see scaling quickly.
HPA_SYNC=${HPA_SYNC:-5s}

log() { printf '[cluster-up] %s\n' "$*" >&2; }

# wait_until what timeout_seconds command...
wait_until() {
	local what=$1 limit=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $deadline ]; then
			log "$what not ready after ${limit}s; last log lines:"
			tail -n 30 "$state/logs/$what.log" >&2 || true
			exit 1
		fi
		sleep 0.5
	done
	log "$what ready"
}


"$here/pki.sh" "$pki"
kubeconfig "$state/kubeconfig" "https://127.0.0.1:$APISERVER_PORT" admin admin
kubeconfig "$state/controller-manager.kubeconfig" "https://127.0.0.1:$APISERVER_PORT" controller-manager controller-manager
kubeconfig "$state/scheduler.kubeconfig" "https://127.0.0.1:$APISERVER_PORT" scheduler scheduler

# etcd: plain HTTP, bound to loopback only; nothing else on the machine can reach it.
start etcd "$bin/etcd" --name local --data-dir "$state/etcd" \
	--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
	--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
	--initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" \
	--unsafe-no-fsync --quota-backend-bytes=2147483648 --log-level warn

cat >"$state/nats.conf" <<NATSCONF
listen: 127.0.0.1:$NATS_PORT
http: 127.0.0.1:$NATS_MONITOR_PORT
jetstream { store_dir: "$state/nats", max_memory_store: 256MB, max_file_store: 1GB }
websocket { listen: "127.0.0.1:$NATS_WS_PORT", no_tls: true }
NATSCONF
start nats-server "$bin/nats-server" -c "$state/nats.conf"

# Nothing on this machine routes the Service range until the node tier does; until then a
# ClusterIP dialled here must fail at once rather than follow the default route off the machine.
if [ "$(id -u)" -eq 0 ] && [ -z "$(ip route show "$SERVICE_CIDR")" ]; then
	ip route replace unreachable "$SERVICE_CIDR"
fi

wait_until etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

start kube-apiserver "$bin/kube-apiserver" \
	--etcd-servers "http://127.0.0.1:$ETCD_PORT" \
	--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
	--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
	--client-ca-file "$pki/ca.crt" \
	--service-account-issuer https://kubernetes.default.svc.cluster.local \
	--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
	--service-cluster-ip-range "$SERVICE_CIDR" \
	--authorization-mode Node,RBAC \
	--allow-privileged=true \
	--kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
	--kubelet-client-key "$pki/apiserver-kubelet-client.key" \
	--kubelet-preferred-address-types InternalIP,Hostname \
	--requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
	--requestheader-allowed-names front-proxy-client \
	--requestheader-username-headers X-Remote-User \
	--requestheader-group-headers X-Remote-Group \
	--requestheader-extra-headers-prefix X-Remote-Extra- \
	--requestheader-uid-headers X-Remote-Uid \
	--proxy-client-cert-file "$pki/front-proxy-client.crt" \
	--proxy-client-key-file "$pki/front-proxy-client.key" \
	--enable-aggregator-routing=true \
	--endpoint-reconciler-type none \
	--profiling=false --v 1
# The endpoint reconciler is off: the `kubernetes` Service's endpoints may not be loopback.

apiserver_ready() {
	curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
		"https://127.0.0.1:$APISERVER_PORT/readyz"
}
wait_until kube-apiserver 180 apiserver_ready

start kube-controller-manager "$bin/kube-controller-manager" \
	--kubeconfig "$state/controller-manager.kubeconfig" \
	--authentication-kubeconfig "$state/controller-manager.kubeconfig" \
	--authorization-kubeconfig "$state/controller-manager.kubeconfig" \
	--bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
	--use-service-account-credentials=true \
	--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
	--cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
	--service-cluster-ip-range "$SERVICE_CIDR" \
	--horizontal-pod-autoscaler-sync-period "$HPA_SYNC" \
	--leader-elect=false --profiling=false --v 1

start kube-scheduler "$bin/kube-scheduler" \
	--kubeconfig "$state/scheduler.kubeconfig" \
	--authentication-kubeconfig "$state/scheduler.kubeconfig" \
	--authorization-kubeconfig "$state/scheduler.kubeconfig" \
	--bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" \
	--leader-elect=false --profiling=false --v 1

wait_until kube-controller-manager 120 curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
wait_until kube-scheduler 120 curl -fsSk "https://127.0.0.1:$SCHEDULER_PORT/healthz"
wait_until nats-server 60 curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true"

# The service-account controller must have run before any namespace can hold pods.
default_sa() { KUBECONFIG="$state/kubeconfig" kubectl get serviceaccount default -n default; }
wait_until kube-controller-manager 120 default_sa

echo "nats://127.0.0.1:$NATS_PORT" >"$state/nats-url"
echo "ws://127.0.0.1:$NATS_WS_PORT" >"$state/nats-ws-url"
log "ready: KUBECONFIG=$state/kubeconfig NATS_URL=$(cat "$state/nats-url")"
