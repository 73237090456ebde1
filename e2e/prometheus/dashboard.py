#!/usr/bin/env python3
"""Writes the Grafana dashboard of wsrelay, charts/wsrelay-operator/dashboards/wsrelay.json.

The panels and their PromQL are listed once, here; the JSON is generated from them (Grafana's
dashboard model, schemaVersion 39). `--check` fails when the file differs from what this
prints (e2e/chart-check.sh runs it), so the JSON is never edited by hand.

e2e/tests/observability.rs runs every `expr` of the JSON against a live Prometheus scraping
the local fleet, with the dashboard variables replaced ($namespace, $gateway by the test's
gateway, $__rate_interval by 30s) and fails unless each returns at least one series.
`--list` prints the expressions one per line (for reading, or for `promtool query`).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "charts", "wsrelay-operator", "dashboards", "wsrelay.json")

GW = 'namespace=~"$namespace", gateway=~"$gateway"'
RI = "$__rate_interval"

# (row title, [panel]); a panel is (title, type, unit, description, [(expr, legend)]).
ROWS = [
    ("Connections", [
        ("Open connections per gateway", "timeseries", "short",
         "wsrelay_connections summed over each gateway's relay pods (what the HPA scales on).",
         [(f"sum by (namespace, gateway) (wsrelay_connections{{{GW}}})", "{{namespace}}/{{gateway}}")]),
        ("Open connections per pod", "timeseries", "short",
         "wsrelay_connections of each relay pod.",
         [(f"sum by (namespace, gateway, pod) (wsrelay_connections{{{GW}}})", "{{pod}}")]),
        ("Connections per pod vs target", "timeseries", "short",
         "Average open connections per relay pod against spec.autoscaling.targetConnectionsPerPod.",
         [(f"sum by (namespace, gateway) (wsrelay_connections{{{GW}}}) / count by (namespace, gateway) (wsrelay_connections{{{GW}}})",
           "{{gateway}} per pod"),
          (f"max by (namespace, gateway) (wsrelay_operator_gateway_target_connections_per_pod{{{GW}}})",
           "{{gateway}} target")]),
    ]),
    ("Handshakes and refusals", [
        ("Handshakes accepted", "timeseries", "reqps",
         "WebSocket upgrades accepted per second.",
         [(f"sum by (namespace, gateway) (rate(wsrelay_connections_accepted_total{{{GW}}}[{RI}]))", "{{gateway}}")]),
        ("Refusals by reason", "timeseries", "reqps",
         "Requests refused before the upgrade, per second, by reason (invalid_token, origin, max_connections, ...).",
         [(f"sum by (reason) (rate(wsrelay_connections_refused_total{{{GW}}}[{RI}]))", "{{reason}}")]),
        ("Handshakes in flight", "timeseries", "short",
         "HTTP handshakes between TCP accept and the upgrade (limits.maxHandshakesInFlight bounds it).",
         [(f"sum by (namespace, gateway, pod) (wsrelay_handshakes_in_flight{{{GW}}})", "{{pod}}")]),
    ]),
    ("Deliveries and drops", [
        ("Messages delivered and published", "timeseries", "ops",
         "Message frames written to clients, and client publishes sent to NATS, per second.",
         [(f"sum by (namespace, gateway) (rate(wsrelay_messages_delivered_total{{{GW}}}[{RI}]))", "{{gateway}} delivered"),
          (f"sum by (namespace, gateway) (rate(wsrelay_messages_published_total{{{GW}}}[{RI}]))", "{{gateway}} published")]),
        ("Messages dropped by reason", "timeseries", "ops",
         "Messages not delivered or not published, per second, by reason.",
         [(f"sum by (reason) (rate(wsrelay_messages_dropped_total{{{GW}}}[{RI}]))", "{{reason}}")]),
        ("Connections closed by reason", "timeseries", "ops",
         "Connections closed per second, by why (slow_consumer, drain, idle, normal, ...).",
         [(f"sum by (reason) (rate(wsrelay_connections_closed_total{{{GW}}}[{RI}]))", "{{reason}}")]),
        ("Bytes queued to clients", "timeseries", "bytes",
         "Bytes in every send queue of a pod (limits.maxQueuedBytes bounds it).",
         [(f"sum by (namespace, gateway, pod) (wsrelay_queued_bytes{{{GW}}})", "{{pod}}")]),
    ]),
    ("Delivery latency", [
        ("Delivery latency (NATS receive to socket write)", "timeseries", "s",
         "Percentiles of wsrelay_delivery_latency_seconds over the gateway's pods.",
         [(f"histogram_quantile({q}, sum by (le, namespace, gateway) (rate(wsrelay_delivery_latency_seconds_bucket{{{GW}}}[{RI}])))",
           f"{{{{gateway}}}} p{label}") for q, label in (("0.5", "50"), ("0.99", "99"), ("0.999", "99.9"))]),
    ]),
    ("NATS", [
        ("NATS connected", "timeseries", "short",
         "1 while the relay pod's NATS connection is up.",
         [(f"min by (namespace, gateway, pod) (wsrelay_nats_connected{{{GW}}})", "{{pod}}")]),
        ("NATS subscriptions", "timeseries", "short",
         "NATS subscriptions held (one per distinct subject per pod).",
         [(f"sum by (namespace, gateway) (wsrelay_nats_subscriptions{{{GW}}})", "{{gateway}}")]),
        ("NATS disconnects (1h)", "timeseries", "short",
         "NATS connection losses in the last hour.",
         [(f"sum by (namespace, gateway) (increase(wsrelay_nats_disconnects_total{{{GW}}}[1h]))", "{{gateway}}")]),
    ]),
    ("Autoscaling", [
        ("HPA desired vs current replicas", "timeseries", "short",
         "The gateway HPA's desired and current replicas, the Ready relay pods, and spec.autoscaling.maxReplicas.",
         [(f"max by (namespace, gateway) (wsrelay_operator_hpa_desired_replicas{{{GW}}})", "{{gateway}} desired"),
          (f"max by (namespace, gateway) (wsrelay_operator_hpa_current_replicas{{{GW}}})", "{{gateway}} current"),
          (f"max by (namespace, gateway) (wsrelay_operator_gateway_ready_replicas{{{GW}}})", "{{gateway}} ready"),
          (f"max by (namespace, gateway) (wsrelay_operator_gateway_max_replicas{{{GW}}})", "{{gateway}} max")]),
        ("Custom metrics API scrapes", "timeseries", "ops",
         "Relay /metrics scrapes by the operator's custom metrics API, and pods left out of an answer.",
         [("sum by (pod) (rate(wsrelay_operator_metrics_api_scrapes_total[%s]))" % RI, "{{pod}} ok"),
          ("sum by (pod) (rate(wsrelay_operator_metrics_api_scrape_failures_total[%s]))" % RI, "{{pod}} left out")]),
    ]),
    ("Operator", [
        ("Reconciles and failures", "timeseries", "ops",
         "Reconciles started per second, and failures by category.",
         [("sum(rate(wsrelay_operator_reconciles_total[%s]))" % RI, "reconciles"),
          ("sum by (category) (rate(wsrelay_operator_reconcile_failures_total[%s]))" % RI, "failed: {{category}}")]),
        ("Reconcile duration p99 by stage", "timeseries", "s",
         "p99 of each pipeline stage (fetch, validate, build, apply, status) and of the whole reconcile.",
         [("histogram_quantile(0.99, sum by (le, stage) (rate(wsrelay_operator_reconcile_stage_duration_seconds_bucket[%s])))" % RI, "{{stage}}"),
          ("histogram_quantile(0.99, sum by (le) (rate(wsrelay_operator_reconcile_duration_seconds_bucket[%s])))" % RI, "reconcile")]),
        ("Gateway conditions", "table", "short",
         "Each condition of each gateway's status, with its reason.",
         [(f"max by (namespace, gateway, type, status, reason) (wsrelay_operator_gateway_condition{{{GW}}})", "")]),
        ("Leader", "stat", "short",
         "Operator replicas holding the lease (1 is right).",
         [("sum(wsrelay_operator_leader)", "leaders")]),
    ]),
    ("Drain", [
        ("Relays draining", "timeseries", "short",
         "Relay pods draining (wsrelay_draining), and pods being deleted or deleted longer ago than the drain grace period (from the operator).",
         [(f"sum by (namespace, gateway) (wsrelay_draining{{{GW}}})", "{{gateway}} draining"),
          (f"max by (namespace, gateway) (wsrelay_operator_gateway_terminating_pods{{{GW}}})", "{{gateway}} terminating"),
          (f"max by (namespace, gateway) (wsrelay_operator_gateway_drain_overdue_pods{{{GW}}})", "{{gateway}} overdue")]),
        ("Drain progress", "timeseries", "short",
         "Connections still held by draining pods, and drain closes per second.",
         [(f"sum by (namespace, gateway) (wsrelay_connections{{{GW}}} * on (namespace, pod) group_left wsrelay_draining{{{GW}}})",
           "{{gateway}} connections on draining pods"),
          (f"sum by (namespace, gateway) (rate(wsrelay_connections_closed_total{{{GW}, reason=\"drain\"}}[{RI}]))",
           "{{gateway}} drain closes/s")]),
    ]),
]


def dashboard():
    panels = []
    y = 0
    pid = 1
    for row, items in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        width = 24 // min(len(items), 3) if len(items) != 4 else 6
        x = 0
        for title, kind, unit, desc, queries in items:
            if x + width > 24:
                x = 0
                y += 8
            panel = {
                "type": kind,
                "title": title,
                "description": desc,
                "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {},
                "targets": [],
            }
            if kind == "timeseries":
                panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                    "tooltip": {"mode": "multi", "sort": "none"}}
            if kind == "table":
                panel["transformations"] = [{"id": "labelsToFields", "options": {}}]
            for i, (expr, legend) in enumerate(queries):
                t = {"datasource": {"type": "prometheus", "uid": "${datasource}"},
                     "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                if kind == "table":
                    t.update({"instant": True, "format": "table"})
                panel["targets"].append(t)
            panels.append(panel)
            pid += 1
            x += width
        y += 8

    def var(name, label, query):
        return {
            "name": name, "label": label, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": f"{name}-var"},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return {
        "title": "wsrelay",
        "uid": "wsrelay-overview",
        "description": "wsrelay relay fleets and operator (generated by e2e/prometheus/dashboard.py)",
        "tags": ["wsrelay", "websocket", "nats"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            var("namespace", "Namespace", "label_values(wsrelay_connections, namespace)"),
            var("gateway", "Gateway", 'label_values(wsrelay_connections{namespace=~"$namespace"}, gateway)'),
        ]},
        "panels": panels,
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail when the JSON differs from the generator")
    ap.add_argument("--list", action="store_true", help="print every expr, one per line")
    a = ap.parse_args()
    text = render()
    if a.list:
        for p in dashboard()["panels"]:
            for t in p.get("targets", []):
                print(t["expr"])
        return
    if a.check:
        try:
            have = open(OUT).read()
        except OSError:
            have = ""
        if have != text:
            sys.exit(f"{os.path.relpath(OUT, ROOT)} differs from e2e/prometheus/dashboard.py: run e2e/prometheus/dashboard.py")
        return
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
