#!/usr/bin/env python3
"""Draws the wsrelay dashboard's panels from a run of e2e/tests/observability.rs.

Not Grafana: Grafana's frontend cannot be built here, so this is a plot, with matplotlib, of the
same PromQL the dashboard JSON holds, as a real Prometheus answered it (query_range, 5 s step)
over the load window of the test. One subplot per dashboard panel, one line per series, titled
like the panel. Input: target/observability/dashboard-data.json (written by the test); output:
docs/operations/dashboard.png (or the path given).

usage: e2e/prometheus/plot.py [DATA_JSON [OUT_PNG]]
"""
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def legend(metric, expr, fmt):
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(metric.get(m.group(1), "")), fmt)
    keep = {k: v for k, v in metric.items() if k not in ("namespace",)}
    if not keep:
        # An aggregate without labels: name it after its function.
        m = re.match(r"\s*(\w+)", expr)
        return m.group(1) if m else "value"
    return ",".join(f"{k}={v}" for k, v in sorted(keep.items()))


def main():
    data_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/observability/dashboard-data.json")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "docs/operations/dashboard.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.load(open(data_path))
    # The test writes the queries in the dashboard's order: their legends come from it.
    dash = json.load(open(os.path.join(ROOT, "charts/wsrelay-operator/dashboards/wsrelay.json")))
    fmts = [t.get("legendFormat", "") for p in dash["panels"] for t in p.get("targets", [])]
    if len(fmts) == len(d["queries"]):
        for q, f in zip(d["queries"], fmts):
            q["legend"] = f
    t0 = d["from"]
    panels = {}
    for q in d["queries"]:
        panels.setdefault(q["title"], []).append(q)
    n = len(panels)
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5, rows * 3.2))
    for ax, (title, qs) in zip(axes.flat, panels.items()):
        lines = 0
        for q in qs:
            for s in q["result"]:
                xs = [float(t) - t0 for t, _ in s["values"]]
                ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in s["values"]]
                ax.plot(xs, ys, linewidth=1.2, label=legend(s["metric"], q["expr"], q.get("legend"))[:40])
                lines += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s since the plot window began", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if 0 < lines <= 8:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "wsrelay dashboard queries against the local fleet (Prometheus query_range, 5 s step; plotted with matplotlib, not Grafana)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=70)
    print(out)


if __name__ == "__main__":
    main()
