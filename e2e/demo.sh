#!/usr/bin/env bash
# `make demo`: the product on the local cluster as far as it runs today.
# Installs the CRD, starts the operator (a process on loopback, watching only namespace `demo`
# so it never touches e2e test namespaces),
# applies examples/gateway.yaml in namespace `demo`, and shows what the operator made of it.
# Assumes `make cluster-up` ran; safe to run again.
set -euo pipefail
source "$(dirname "$0")/cluster/lib.sh"
cd "$root"
ns=demo
operator_admin=127.0.0.1:18080

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing the WebsocketGateway CRD (crds/)"
kubectl apply --server-side -f crds/
kubectl wait --for condition=established --timeout=60s crd/websocketgateways.wsrelay.dev

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -

say "Starting the operator (logs: .cluster/logs/wsrelay-operator.log)"
cargo build -q -p wsrelay-operator
if pid=$(running_pid wsrelay-operator); then
	echo "already running (pid $pid); restarting it on the fresh build"
	kill -TERM "$pid"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
fi
setsid target/debug/wsrelay-operator run --namespace "$ns" --lease-namespace "$ns" --admin-addr "$operator_admin" \
	>>"$state/logs/wsrelay-operator.log" 2>&1 </dev/null &
echo $! >"$state/pids/wsrelay-operator.pid"
until curl -fsS "http://$operator_admin/ready" >/dev/null 2>&1; do sleep 0.5; done
echo "operator ready: http://$operator_admin/metrics"

say "Applying examples/gateway.yaml in namespace $ns"
kubectl apply -n "$ns" -f examples/gateway.yaml
generation=$(kubectl get wsgw chat -n "$ns" -o jsonpath='{.metadata.generation}')
kubectl wait -n "$ns" wsgw/chat --timeout=60s \
	--for=jsonpath='{.status.observedGeneration}'="$generation"

say "kubectl get wsgw -n $ns"
kubectl get wsgw -n "$ns"
say "What the operator made of it"
kubectl get sa,cm,deploy,svc,hpa,pdb,networkpolicy -n "$ns" -l app.kubernetes.io/instance=chat
say "Its conditions"
kubectl get wsgw chat -n "$ns" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
cat <<TEXT

No node runs at this tier yet, so the relay pods stay Pending and the gateway is not Ready.
Try:
  export KUBECONFIG=$state/kubeconfig PATH=$WSRELAY_CACHE/path:\$PATH
  kubectl explain websocketgateway.spec.bindings
  kubectl get cm chat -n $ns -o yaml                 # the relay config the operator rendered
  kubectl edit wsgw chat -n $ns                      # change a binding: the pod template hash changes
  kubectl apply -n $ns -f - <<< '{"apiVersion":"wsrelay.dev/v1alpha1","kind":"WebsocketGateway","metadata":{"name":"bad"},"spec":{}}'
                                                     # refused by the API server, with the reason
Stop everything with: make cluster-down
TEXT
