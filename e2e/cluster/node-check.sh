#!/usr/bin/env bash
# Proves the node (node-up.sh) works end to end, in namespace node-check (removed after):
#   1. a pod runs on wsrelay-node with an IP in the pod range, and passes a TCP readiness probe
#   2. the host reaches that pod's IP over TCP
#   3. a ClusterIP Service routes to it (kube-proxy), from the host and from another pod
#   4. a pod reaches the API server through the `kubernetes` Service (10.96.0.1:443), TLS
#      verified against its service-account CA, authenticated with its token
#   5. kubectl logs works (API server -> kubelet on 10.202.0.2:10250)
#   6. a pod reaches NATS on the node's bridge (nats://10.202.0.2:4222)
#   7. kubectl exec and kubectl port-forward work (kubelet -> containerd streaming)
# Prints the time to the first pod Running. usage: node-check.sh BIN_DIR
set -euo pipefail
bin=$1
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$state/kubeconfig PATH=$bin:$PATH
ns=node-check
image=$(cat "$state/node/nodecheck-image")
start_time=$SECONDS

log() { printf '[node-check] %s\n' "$*" >&2; }
fail() {
	log "FAILED: $*"
	kubectl -n "$ns" get pods -o wide >&2 || true
	kubectl -n "$ns" get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 20 >&2 || true
	exit 1
}
# wait_for what timeout command...
wait_for() {
	local what=$1 limit=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $deadline ] || fail "$what (after ${limit}s)"
		sleep 0.5
	done
}

kubectl delete namespace "$ns" --ignore-not-found --wait=true --timeout=120s >/dev/null
kubectl create namespace "$ns" >/dev/null
wait_for "default service account in $ns" 60 kubectl -n "$ns" get serviceaccount default

pod() { # name restartPolicy args...
	local name=$1 restart=$2
	shift 2
	local args
	args=$(printf '"%s",' "$@")
	cat <<YAML
---
apiVersion: v1
kind: Pod
metadata: { name: $name, namespace: $ns, labels: { app: $name } }
spec:
  restartPolicy: $restart
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: $image
    imagePullPolicy: Never
    args: [${args%,}]
YAML
}

{
	pod server Always serve :8080
	cat <<YAML
    readinessProbe: { tcpSocket: { port: 8080 }, periodSeconds: 1 }
---
apiVersion: v1
kind: Service
metadata: { name: server, namespace: $ns }
spec:
  selector: { app: server }
  ports: [{ port: 80, targetPort: 8080 }]
YAML
} | kubectl apply -f - >/dev/null

running() { [ "$(kubectl -n "$ns" get pod "$1" -o jsonpath='{.status.phase}')" = Running ]; }
wait_for "pod server Running" 120 running server
log "1. pod server Running after $((SECONDS - start_time))s"
ip=$(kubectl -n "$ns" get pod server -o jsonpath='{.status.podIP}')
node=$(kubectl -n "$ns" get pod server -o jsonpath='{.spec.nodeName}')
IFS=. read -r a b c _ <<<"$ip"
[ "$a.$b" = 10.202 ] && [ "$c" -ge 64 ] && [ "$c" -le 127 ] || fail "pod IP '$ip' is not in 10.202.64.0/18"
[ "$node" = wsrelay-node ] || fail "pod on node '$node'"
ready() { [ "$(kubectl -n "$ns" get pod server -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for "pod server Ready (tcp probe)" 60 ready
log "1. pod IP $ip on $node, TCP readiness probe passed"

out=$(nodecheck dial "$ip:8080") || fail "host -> pod $ip:8080"
log "2. host -> pod $ip:8080: $out"

cluster_ip=$(kubectl -n "$ns" get service server -o jsonpath='{.spec.clusterIP}')
# kube-proxy programs the Service once it has seen the endpoint; retry until then.
wait_for "host -> Service $cluster_ip:80" 60 nodecheck dial "$cluster_ip:80"
log "3. host -> Service $cluster_ip:80: $(nodecheck dial "$cluster_ip:80")"

{
	pod client Never dial "$cluster_ip:80"
	pod apiserver Never apiserver
	pod nats Never dial 10.202.0.2:4222
} | kubectl apply -f - >/dev/null
succeeded() {
	local phase
	phase=$(kubectl -n "$ns" get pod "$1" -o jsonpath='{.status.phase}')
	[ "$phase" = Failed ] && fail "pod $1 failed: $(kubectl -n "$ns" logs "$1" 2>&1)"
	[ "$phase" = Succeeded ]
}
wait_for "pod client Succeeded" 120 succeeded client
out=$(kubectl -n "$ns" logs client 2>&1) || fail "kubectl logs (API server -> kubelet): $out"
log "3. pod -> Service $cluster_ip:80: $out"
wait_for "pod apiserver Succeeded" 120 succeeded apiserver
out=$(kubectl -n "$ns" logs apiserver 2>&1) || fail "kubectl logs (API server -> kubelet): $out"
log "4. pod -> API server: $(echo "$out" | tr -d '\n ' | cut -c1-100)"
log "5. kubectl logs works (API server -> kubelet)"
wait_for "pod nats Succeeded" 120 succeeded nats
out=$(kubectl -n "$ns" logs nats 2>&1) || fail "kubectl logs: $out"
case $out in INFO*) ;; *) fail "pod -> NATS 10.202.0.2:4222 said: $out" ;; esac
log "6. pod -> NATS 10.202.0.2:4222: $(echo "$out" | cut -c1-60)..."

out=$(kubectl -n "$ns" exec server -- /nodecheck dial 127.0.0.1:8080 2>&1) || fail "kubectl exec: $out"
log "7. kubectl exec: $out"
port=$((20000 + RANDOM % 10000))
kubectl -n "$ns" port-forward pod/server "$port:8080" >/dev/null 2>&1 &
pf=$!
wait_for "kubectl port-forward" 30 nodecheck dial "127.0.0.1:$port"
kill "$pf" 2>/dev/null || true
wait "$pf" 2>/dev/null || true
log "7. kubectl port-forward: 127.0.0.1:$port -> server:8080"

kubectl delete namespace "$ns" --wait=true --timeout=120s >/dev/null || fail "deleting namespace $ns"
log "passed in $((SECONDS - start_time))s"
