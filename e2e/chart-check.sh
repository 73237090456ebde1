#!/usr/bin/env bash
# Checks the Helm chart charts/wsrelay-operator offline, with no cluster:
#   - helm lint --strict with the default values and every charts/wsrelay-operator/ci/*.yaml;
#   - helm template of each of those piped to kubeconform -strict against JSON schemas made
#     here from Kubernetes' own OpenAPI document (the pinned release, from the Go module
#     cache), the chart's CRD and cert-manager's CRDs; a kind without a schema fails;
#   - the generated serving certificate verifies for both Services' names with the caBundle
#     of the APIServices and the webhook configuration; the webhook's rules and scope;
#   - invalid values files are refused by values.schema.json;
#   - no Role or ClusterRole grants list or watch on Secrets (every values set above);
#   - the operator's NetworkPolicy admits its admin port only from relayAdminAccess.from;
#   - drift: the chart's CRD equals crds/, Chart version and appVersion equal the workspace
#     version, the image repository equals images/images.env.
# helm and kubeconform are built by e2e/cluster/tools.sh; the schemas are cached in
# $WSRELAY_CACHE/schemas/<key>.
#
# usage: e2e/chart-check.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
chart=$root/charts/wsrelay-operator
cache=${WSRELAY_CACHE:-$HOME/.cache/wsrelay}
# cert-manager's CRDs, to check the Issuer and Certificate the chart renders with
# servingCertificate.certManager.enabled. A Go module, so the module proxy has it.
cert_manager=v1.21.2
# The Prometheus Operator's CRDs, to check the PodMonitors and PrometheusRule the chart renders
# with monitoring.* (also a Go module).
prometheus_operator=v0.85.0
release=wsrelay-operator
namespace=wsrelay-system

log() { printf '[chart-check] %s\n' "$*" >&2; }
fail() { printf '[chart-check] FAIL: %s\n' "$*" >&2; exit 1; }

PATH=$("$root/e2e/cluster/tools.sh" helm kubeconform):$PATH
export GOFLAGS=-mod=readonly

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- drift -------------------------------------------------------------------------------
version=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 } p && $1 == "version" { gsub(/"/, "", $3); print $3 }' "$root/Cargo.toml")
[ -n "$version" ] || fail "no [workspace.package] version in Cargo.toml"
chart_field() { awk -v k="$1:" '$1 == k { gsub(/"/, "", $2); print $2 }' "$chart/Chart.yaml"; }
[ "$(chart_field version)" = "$version" ] ||
	fail "Chart.yaml version $(chart_field version) is not the workspace version $version (Cargo.toml)"
[ "$(chart_field appVersion)" = "$version" ] ||
	fail "Chart.yaml appVersion $(chart_field appVersion) is not the workspace version $version (Cargo.toml)"
cmp -s "$root/crds/websocketgateways.wsrelay.dev.yaml" "$chart/crds/websocketgateways.wsrelay.dev.yaml" ||
	fail "charts/wsrelay-operator/crds/ differs from crds/: cp crds/websocketgateways.wsrelay.dev.yaml charts/wsrelay-operator/crds/"
repository=$(awk '/^image:/ { p = 1; next } /^[^ #]/ { p = 0 } p && $1 == "repository:" { print $2 }' "$chart/values.yaml")
if [ -f "$root/images/images.env" ]; then
	want=$(. "$root/images/images.env" && echo "${OPERATOR_IMAGE:?images.env has no OPERATOR_IMAGE}")
	[ "$repository" = "$want" ] ||
		fail "values.yaml image.repository $repository is not OPERATOR_IMAGE $want (images/images.env)"
else
	log "no images/images.env: image repository not compared"
fi
# Every top-level value is documented in the chart's README.
for k in $(awk -F: '/^[a-zA-Z]/ { print $1 }' "$chart/values.yaml"); do
	grep -q "^| \`$k[.\`]" "$chart/README.md" || fail "value $k is not in the values table of charts/wsrelay-operator/README.md"
done
log "drift: chart $version, CRD, image repository $repository and the README's values table agree"
# The dashboard JSON is generated from e2e/prometheus/dashboard.py.
python3 "$root/e2e/prometheus/dashboard.py" --check || fail "dashboard drift"
log "drift: dashboards/wsrelay.json is what e2e/prometheus/dashboard.py writes"

# --- schemas -----------------------------------------------------------------------------
kube=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 } $1 == "k8s.io/kubernetes" && NF == 2 { print $2 }' \
	"$root/e2e/cluster/go/kubernetes/go.mod" | head -n1)
gen=$root/e2e/cluster/go/kubeconform
key=$( (echo "$kube $cert_manager $prometheus_operator" && cat "$gen/schemas/main.go" "$gen/go.mod" "$gen/go.sum" "$root/crds/websocketgateways.wsrelay.dev.yaml") |
	sha256sum | cut -c1-12)
schemas=$cache/schemas/$key
if [ ! -f "$schemas/.done" ]; then
	log "writing JSON schemas for Kubernetes $kube, cert-manager $cert_manager and the CRD into $schemas"
	dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }
	kdir=$(cd "$root/e2e/cluster/go/kubernetes" && dir "k8s.io/kubernetes@$kube")
	cdir=$(cd "$tmp" && GOFLAGS=-mod=mod dir "github.com/cert-manager/cert-manager@$cert_manager")
	pdir=$(cd "$tmp" && GOFLAGS=-mod=mod dir "github.com/prometheus-operator/prometheus-operator@$prometheus_operator")
	[ -n "$kdir" ] && [ -n "$cdir" ] && [ -n "$pdir" ] || fail "go mod download found no module directory"
	(cd "$gen" && go build -o "$tmp/schemas" ./schemas)
	rm -rf "$schemas.tmp"
	"$tmp/schemas" -out "$schemas.tmp" -swagger "$kdir/api/openapi-spec/swagger.json" \
		-crd "$root/crds/websocketgateways.wsrelay.dev.yaml" \
		-crd "$cdir/deploy/crds/cert-manager.io_issuers.yaml" \
		-crd "$cdir/deploy/crds/cert-manager.io_certificates.yaml" \
		-crd "$pdir/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml" \
		-crd "$pdir/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"
	rm -rf "$schemas" && mv "$schemas.tmp" "$schemas" && touch "$schemas/.done"
	# Schemas of older pins and generators go.
	find "$cache/schemas" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
fi
location="$schemas/standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"

# Every object must have a schema and pass it strictly (unknown fields are errors).
conform() {
	local out
	out=$(kubeconform -strict -summary -schema-location "$location" "$@" 2>&1) || { echo "$out" >&2; return 1; }
	grep -q ' found in .* Valid: [1-9]' <<<"$out" || { echo "$out" >&2; echo "no object checked" >&2; return 1; }
	log "  ${out##*$'\n'}"
}

# No Role or ClusterRole the chart renders may let the operator list or watch Secrets
# (RBAC cannot narrow those to metadata: they hand over every Secret's data); `get` by name
# is all it needs. Wildcards count.
no_secret_listing() {
	python3 - "$1" <<'PY'
import sys, yaml
bad = []
for d in yaml.safe_load_all(open(sys.argv[1])):
    if not d or d.get("kind") not in ("Role", "ClusterRole"):
        continue
    where = d["kind"] + " " + d["metadata"]["name"]
    if d.get("aggregationRule"):
        bad.append(where + ": an aggregated role, whose rules cannot be checked here")
    for i, r in enumerate(d.get("rules") or []):
        core = {"", "*"} & set(r.get("apiGroups") or [])
        secrets = {"secrets", "*"} & set(r.get("resources") or [])
        verbs = sorted({"list", "watch", "*"} & set(r.get("verbs") or []))
        if core and secrets and verbs:
            bad.append("%s, rule %d (resources %s): verbs %s on Secrets" % (where, i + 1, r["resources"], verbs))
for b in bad:
    print("  " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

# --- lint and render ---------------------------------------------------------------------
sets=("")
for f in "$chart"/ci/*.yaml; do sets+=("${f#"$root"/}"); done
for set in "${sets[@]}"; do
	args=()
	[ -z "$set" ] || args=(-f "$root/$set")
	log "values: ${set:-defaults}"
	helm lint --strict --quiet "$chart" "${args[@]}" >"$tmp/lint" 2>&1 || { cat "$tmp/lint" >&2; fail "helm lint"; }
	helm template "$release" "$chart" -n "$namespace" --include-crds "${args[@]}" >"$tmp/out.yaml" ||
		fail "helm template ${set:-defaults}"
	conform "$tmp/out.yaml" || fail "kubeconform ${set:-defaults}"
	no_secret_listing "$tmp/out.yaml" ||
		fail "with values ${set:-defaults}, a role the chart renders grants list or watch on Secrets (above); the operator needs only get"
	log "  no role grants list or watch on Secrets"
	grep -q '^kind: NetworkPolicy$' "$tmp/out.yaml" || fail "with values ${set:-defaults}, no NetworkPolicy for the operator pods"
done
log "examples/gateway.yaml against the CRD"
conform "$root/examples/gateway.yaml" || fail "examples/gateway.yaml does not fit the CRD"

# The generated certificate: the caBundle of the APIServices and of the webhook configuration
# is the Secret's CA (one render makes one CA for all), which verifies the serving certificate
# for both Services' <service>.<namespace>.svc.
helm template "$release" "$chart" -n "$namespace" --show-only templates/serving-cert.yaml \
	--show-only templates/metrics-api.yaml --show-only templates/webhook.yaml >"$tmp/api.yaml"
field() { awk -v k="$1:" '$1 == k { print $2 }' "$tmp/api.yaml"; }
field ca.crt | base64 -d >"$tmp/ca.crt"
field tls.crt | base64 -d >"$tmp/tls.crt"
for b in $(field caBundle); do
	[ "$b" = "$(field ca.crt)" ] || fail "a caBundle (APIService or webhook) is not the Secret's ca.crt"
done
[ "$(field caBundle | wc -l)" = 3 ] || fail "expected two APIServices and a webhook with a caBundle"
for svc in "$release-metrics-api" "$release-webhook"; do
	openssl verify -CAfile "$tmp/ca.crt" -purpose sslserver \
		-verify_hostname "$svc.$namespace.svc" "$tmp/tls.crt" >/dev/null ||
		fail "the generated certificate does not verify for $svc.$namespace.svc"
	log "generated certificate verifies for $svc.$namespace.svc with the caBundle"
done
# The webhook: for gateways' CREATE and UPDATE (not their status), scoped as the operator is.
webhook() {
	helm template "$release" "$chart" -n "$namespace" --show-only templates/webhook.yaml "$@" >"$tmp/webhook.yaml"
	python3 - "$tmp/webhook.yaml" "$want_webhook" <<'PY'
import json, sys, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
w = docs["ValidatingWebhookConfiguration"]["webhooks"][0]
want = json.loads(sys.argv[2])
got = {k: w.get(k) for k in want}
if got != want:
    sys.exit("rendered %s\nwanted   %s" % (json.dumps(got, sort_keys=True), json.dumps(want, sort_keys=True)))
svc = w["clientConfig"]["service"]
assert svc["path"] == "/validate-websocketgateway" and svc["name"] == docs["Service"]["metadata"]["name"], svc
PY
}
rules='[{"apiGroups": ["wsrelay.dev"], "apiVersions": ["*"], "resources": ["websocketgateways"], "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]'
want_webhook='{"rules": '$rules', "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5, "namespaceSelector": null}'
webhook || fail "the webhook configuration with the default values"
want_webhook='{"rules": '$rules', "failurePolicy": "Ignore", "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}'
webhook -f "$chart/ci/watch-namespace-values.yaml" --set webhook.failurePolicy=Ignore ||
	fail "the webhook configuration with ci/watch-namespace-values.yaml and failurePolicy Ignore"
if helm template "$release" "$chart" -n "$namespace" --set webhook.enabled=false | grep -q '^kind: ValidatingWebhookConfiguration$'; then
	fail "webhook.enabled=false still renders the webhook configuration"
fi
log "webhook: gateways' CREATE and UPDATE, failurePolicy as set, the watched namespace only"

# The PrometheusRule carries monitoring/alerts.yaml's groups unchanged (ruleLabels added to
# every rule when set), and the dashboard ConfigMap the JSON.
helm template "$release" "$chart" -n "$namespace" --show-only templates/monitoring.yaml \
	-f "$chart/ci/monitoring-values.yaml" >"$tmp/monitoring.yaml"
python3 - "$tmp/monitoring.yaml" "$chart/monitoring/alerts.yaml" "$chart/dashboards/wsrelay.json" <<'PY' ||
import json, sys, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
want = yaml.safe_load(open(sys.argv[2]))["groups"]
extra = {"team": "platform"}  # ci/monitoring-values.yaml's ruleLabels
for g in want:
    for r in g["rules"]:
        r["labels"] = {**r.get("labels", {}), **extra}
assert docs["PrometheusRule"]["spec"]["groups"] == want, "PrometheusRule groups differ from monitoring/alerts.yaml"
assert json.loads(docs["ConfigMap"]["data"]["wsrelay.json"]) == json.load(open(sys.argv[3])), "dashboard ConfigMap differs"
assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
PY
	fail "the rendered monitoring objects do not carry monitoring/alerts.yaml and dashboards/wsrelay.json"
log "PrometheusRule = monitoring/alerts.yaml (+ ruleLabels), dashboard ConfigMap = dashboards/wsrelay.json"

# --- values the schema must refuse -------------------------------------------------------
refuse() {
	local name=$1 want=$2
	cat >"$tmp/bad.yaml"
	if helm template "$release" "$chart" -n "$namespace" -f "$tmp/bad.yaml" >/dev/null 2>"$tmp/err"; then
		fail "values with $name were accepted"
	fi
	grep -q -- "$want" "$tmp/err" || { cat "$tmp/err" >&2; fail "values with $name: refused without mentioning $want"; }
	log "refused: $name"
}
refuse 'replicaCount: "two"' "at '/replicaCount': got string, want integer" <<<'replicaCount: "two"'
refuse 'an unknown top-level key' "additional properties 'replicas' not allowed" <<<'replicas: 2'
refuse 'a misspelt nested key' "additional properties 'enable' not allowed" <<<'servingCertificate: {certManager: {enable: true}}'
refuse 'an unknown pull policy' 'pullPolicy' <<<'image: {pullPolicy: Sometimes}'
refuse 'existingSecret without caBundle' "at '/servingCertificate/existingSecret/caBundle'" <<<'servingCertificate: {existingSecret: {name: mine}}'
refuse 'both cert-manager and an own Secret' 'exclude each other' <<<'servingCertificate: {certManager: {enabled: true}, existingSecret: {name: mine, caBundle: QQ==}}'
refuse 'the certificate values where they were before' "additional properties 'certManager' not allowed" <<<'metricsApi: {certManager: {enabled: true}}'
refuse 'a failure policy the API server does not know' "at '/webhook/failurePolicy'" <<<'webhook: {failurePolicy: Retry}'
refuse 'two replicas without leader election' 'leaderElection' <<<'leaderElection: {enabled: false}'
refuse 'a misspelt monitoring key' "additional properties 'enable' not allowed" <<<'monitoring: {podMonitor: {enable: true}}'
refuse 'a scrape interval without unit' "at '/monitoring/podMonitor/interval'" <<<'monitoring: {podMonitor: {interval: "30"}}'
refuse 'a misspelt relay admin peer' "additional properties 'podSelecter' not allowed" <<<'relayAdminAccess: {from: [{podSelecter: {}}]}'
refuse 'a misspelt networkPolicy key' "additional properties 'enable' not allowed" <<<'networkPolicy: {enable: false}'
refuse 'a Secret label that is not key=value' "at '/tenancy/secretLabel'" <<<'tenancy: {secretLabel: usable}'
refuse 'a tenant without a namespace selector' "missing property 'namespaceSelector'" <<<'tenancy: {policy: {enabled: true, tenants: [{name: a}]}}'
refuse 'a NATS URL list written as one string with a comma' "at '/tenancy/policy/tenants/0/natsUrls/0'" <<<'tenancy: {policy: {enabled: true, tenants: [{name: a, namespaceSelector: {}, natsUrls: ["nats://a:4222,nats://b:4222"]}]}}'
# The relays' admin port: the operator's own pods first, then relayAdminAccess.from.
helm template "$release" "$chart" -n "$namespace" --show-only templates/deployment.yaml \
	-f "$chart/ci/watch-namespace-values.yaml" >"$tmp/deploy.yaml"
peers=$(awk '$3 == "WSRELAY_RELAY_ADMIN_PEERS" { getline; sub(/^ *value: /, ""); print }' "$tmp/deploy.yaml")
# helm's quote escapes the JSON's quotes: "[{\"namespaceSelector\": ...
want='[{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"'$namespace'\"}},\"podSelector\":{\"matchLabels\":{\"app.kubernetes.io/instance\":\"'$release'\",\"app.kubernetes.io/name\":\"wsrelay-operator\"}}},{\"namespaceSelector\":{\"matchLabels\":{\"kubernetes.io/metadata.name\":\"monitoring\"}},\"podSelector\":{\"matchLabels\":{\"app.kubernetes.io/name\":\"prometheus\"}}}]'
[ "$peers" = "\"$want\"" ] || fail "WSRELAY_RELAY_ADMIN_PEERS is $peers, wanted \"$want\""
log "relay admin peers: the operator's pods and relayAdminAccess.from"
# The operator's NetworkPolicy: the admin port only from relayAdminAccess.from (no rule at
# all without peers: the node only), the metrics API and webhook ports from anywhere (the
# kube-apiserver) when they are served.
netpol() {
	helm template "$release" "$chart" -n "$namespace" --show-only templates/networkpolicy.yaml "$@" >"$tmp/netpol.yaml"
	python3 - "$tmp/netpol.yaml" "$want_netpol" <<'PY'
import json, sys, yaml
got = yaml.safe_load(open(sys.argv[1]))["spec"]
want = json.loads(sys.argv[2])
if got != want:
    sys.exit("rendered %s\nwanted   %s" % (json.dumps(got, sort_keys=True), json.dumps(want, sort_keys=True)))
PY
}
selector='{"matchLabels": {"app.kubernetes.io/instance": "'$release'", "app.kubernetes.io/name": "wsrelay-operator"}}'
want_netpol='{"podSelector": '$selector', "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 6443, "protocol": "TCP"}]}, {"ports": [{"port": 9443, "protocol": "TCP"}]}]}'
netpol || fail "the operator's NetworkPolicy with the default values"
want_netpol='{"podSelector": '$selector', "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}], "ports": [{"port": 8080, "protocol": "TCP"}]}, {"ports": [{"port": 9443, "protocol": "TCP"}]}]}'
netpol -f "$chart/ci/watch-namespace-values.yaml" || fail "the operator's NetworkPolicy with ci/watch-namespace-values.yaml"
want_netpol='{"podSelector": '$selector', "policyTypes": ["Ingress"], "ingress": []}'
netpol --set metricsApi.enabled=false --set webhook.enabled=false ||
	fail "the operator's NetworkPolicy with no peers, no metrics API and no webhook"
if helm template "$release" "$chart" -n "$namespace" --set networkPolicy.enabled=false | grep -q '^kind: NetworkPolicy$'; then
	fail "networkPolicy.enabled=false still renders a NetworkPolicy"
fi
log "operator NetworkPolicy: admin port from relayAdminAccess.from only, metrics API and webhook ports from anywhere"
# The tenancy policy: off by default; with ci/tenancy-values.yaml one policy, and per tenant
# its parameters and a binding to its namespaces; the operator told the Secret label.
if helm template "$release" "$chart" -n "$namespace" | grep -q '^kind: ValidatingAdmissionPolicy$'; then
	fail "the tenancy policy is rendered with the default values (it is off by default)"
fi
helm template "$release" "$chart" -n "$namespace" -f "$chart/ci/tenancy-values.yaml" >"$tmp/tenancy.yaml"
python3 - "$tmp/tenancy.yaml" "$release" "$namespace" <<'PY' || fail "the tenancy policy with ci/tenancy-values.yaml"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
release, ns = sys.argv[2], sys.argv[3]
kinds = lambda k: [d for d in docs if d["kind"] == k]
policies = kinds("ValidatingAdmissionPolicy")
assert len(policies) == 1, policies
policy = policies[0]["metadata"]["name"]
binds = {b["metadata"]["name"]: b["spec"] for b in kinds("ValidatingAdmissionPolicyBinding")}
params = {c["metadata"]["name"]: c for c in kinds("ConfigMap") if c["metadata"]["name"].startswith(policy)}
assert sorted(binds) == [policy + "-platform", policy + "-team-a"], binds
for name, spec in binds.items():
    assert spec["policyName"] == policy and spec["validationActions"] == ["Deny"], spec
    assert spec["paramRef"] == {"name": name, "namespace": ns, "parameterNotFoundAction": "Deny"}, spec
    assert params[name]["metadata"]["namespace"] == ns
assert binds[policy + "-team-a"]["matchResources"]["namespaceSelector"] == {"matchLabels": {"team": "a"}}
assert params[policy + "-team-a"]["data"] == {"natsUrls": "nats://nats.team-a:4222", "imagePrefixes": "registry.example.com/wsrelay/", "allowPlacement": "false"}
assert params[policy + "-platform"]["data"] == {"allowPlacement": "true"}
env = {e["name"]: e.get("value") for d in kinds("Deployment") for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
assert env.get("WSRELAY_SECRET_LABEL") == "wsrelay.dev/usable=true", env
PY
log "tenancy: off by default; a policy, per tenant its parameters and binding; the Secret label passed on"
log "ok"
