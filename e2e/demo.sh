#!/usr/bin/env bash
# `make demo`: the product on the local cluster with its node, as a user meets it.
#   1. installs the Helm chart (charts/wsrelay-operator): the CRD, the operator (two replicas,
#      leader election) and its custom metrics API;
#   2. applies examples/gateway.yaml in namespace `demo` (its NATS URL pointed at the NATS that
#      pods on the local node reach) and waits for the relay pods;
#   3. runs the client SDK (clients/js, built by `make sdk`) from Node (e2e/demo-client.mjs):
#      it connects with a JWT through the gateway's Service and subscribes, NATS messages are
#      published and it prints them as they arrive through the fleet, then it publishes with
#      an ack;
#   4. shows the gateway's status, its HPA and the connection metric the HPA reads.
# Assumes `make cluster-up NODE=1` ran (make demo does it); safe to run again.
set -euo pipefail
source "$(dirname "$0")/cluster/lib.sh"
cd "$root"
ns=demo
release=wsrelay
release_ns=wsrelay-system

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# The demo's own namespace carries this label; `demo.sh stop` deletes only a namespace with it.
demo_label=wsrelay.dev/demo=true

# `e2e/demo.sh stop` (make e2e runs it first): the e2e suites install the chart themselves and
# register the cluster's custom metrics APIService, which the demo's release holds; remove
# what the demo installed, saying so, and nothing else.
if [ "${1:-}" = stop ]; then
	"$here/tools.sh" helm >/dev/null
	if helm status "$release" --namespace "$release_ns" >/dev/null 2>&1; then
		cat >&2 <<TEXT
== make demo's installation is up (Helm release $release in namespace $release_ns, gateway namespace $ns).
   The e2e suites install the chart and register the custom metrics APIService themselves,
   and the two cannot share the cluster: uninstalling the demo now. Run make demo again afterwards.
TEXT
		helm uninstall "$release" --namespace "$release_ns" --wait --timeout 2m
	fi
	# (kubectl refuses a name together with a label selector: read the label instead.)
	if [ "$(kubectl get namespace "$ns" -o jsonpath='{.metadata.labels.wsrelay\.dev/demo}' 2>/dev/null)" = true ]; then
		echo "== deleting the demo's namespace $ns" >&2
		kubectl delete namespace "$ns" --wait --timeout=2m
	fi
	exit 0
fi

nats_url_file=$state/node/nats-url
[ -f "$nats_url_file" ] || { echo "no node is running: run make cluster-up NODE=1 (as root)" >&2; exit 1; }
pods_nats=$(cat "$nats_url_file")
"$here/tools.sh" helm >/dev/null

say "Installing the chart charts/wsrelay-operator into $release_ns"
helm upgrade --install "$release" charts/wsrelay-operator --namespace "$release_ns" --create-namespace \
	--wait --timeout 5m
kubectl get deploy,pods,svc -n "$release_ns"
kubectl get apiservice v1beta2.custom.metrics.k8s.io

say "Applying examples/gateway.yaml in namespace $ns (NATS for pods: $pods_nats)"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$ns" "$demo_label" --overwrite >/dev/null
# The chart's admission webhook (failurePolicy Fail) answers once the API server has its
# endpoints, a moment after `helm --wait`: retry "failed calling webhook", bounded.
gateway=$(sed "s#nats://127.0.0.1:14222#$pods_nats#" examples/gateway.yaml)
for attempt in $(seq 1 30); do
	if out=$(kubectl apply -n "$ns" -f - <<<"$gateway" 2>&1); then
		echo "$out"
		break
	fi
	if [[ $out != *"failed calling webhook"* || $attempt == 30 ]]; then
		echo "$out" >&2
		exit 1
	fi
	sleep 2
done
kubectl wait -n "$ns" wsgw/chat --for=condition=Ready --timeout=300s
kubectl get wsgw,deploy,pods,svc,hpa -n "$ns" -l app.kubernetes.io/instance=chat -o wide

say "The client SDK (@wsrelay/client, built into clients/js/dist) from Node: a JWT for alice, through Service chat"
[ -f clients/js/dist/esm/index.js ] || { echo "the SDK is not built: run make sdk (make demo does)" >&2; exit 1; }
ip=$(kubectl get svc chat -n "$ns" -o jsonpath='{.spec.clusterIP}')
port=$(kubectl get svc chat -n "$ns" -o jsonpath='{.spec.ports[0].port}')
key=$(kubectl get secret chat-jwt -n "$ns" -o jsonpath='{.data.hmac}' | base64 -d)
# Node 22 has a global WebSocket; Node 20 (10 and later) has it behind a flag.
node_flags=()
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' || node_flags=(--experimental-websocket)
node "${node_flags[@]}" e2e/demo-client.mjs --url "ws://$ip:$port/ws" --hmac-key "$key" \
	--issuer https://auth.example.com --audience chat \
	--user alice --channel notifications --subject users.alice.notify \
	--nats "$(cat "$state/nats-url")" --count 5 --publish-channel rooms.lobby

say "The connection metric the HPA reads (custom.metrics.k8s.io, served by the operator)"
kubectl get --raw "/apis/custom.metrics.k8s.io/v1beta2/namespaces/$ns/pods/*/wsrelay_connections?labelSelector=app.kubernetes.io/instance%3Dchat"
echo
kubectl get wsgw chat -n "$ns"
cat <<TEXT

Try:
  export KUBECONFIG=$state/kubeconfig PATH=$WSRELAY_CACHE/path:\$PATH
  kubectl explain websocketgateway.spec.bindings
  kubectl get cm chat -n $ns -o yaml                 # the relay config the operator rendered
  kubectl edit wsgw chat -n $ns                      # change it: the relays roll, draining clients
  kubectl logs -n $release_ns deploy/$release-wsrelay-operator
  kubectl apply -n $ns -f - <<< '{"apiVersion":"wsrelay.dev/v1alpha1","kind":"WebsocketGateway","metadata":{"name":"bad"},"spec":{}}'
                                                     # refused by the API server, with the reason
make test (make e2e) uninstalls this demo first, saying so; make demo brings it back.
Stop everything with: make cluster-down
TEXT
