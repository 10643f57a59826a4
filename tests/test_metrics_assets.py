"""The Grafana ConfigMap carries exactly the dashboard JSON, and every panel queries our series:
series that metrics.py defines, the recovery series included."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from prom_helpers import RECOVERY_SERIES, dashboard_exprs

K8S = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"


def test_configmap_embeds_the_dashboard_json():
    cm = yaml.safe_load((K8S / "grafana-dashboard-configmap.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    embedded = json.loads(cm["data"]["maverick-ray.json"])
    assert embedded == json.loads((K8S / "grafana-dashboard.json").read_text())


def test_every_panel_queries_maverick_series():
    dash = json.loads((K8S / "grafana-dashboard.json").read_text())
    kinds = {p["type"] for p in dash["panels"]}
    assert "heatmap" in kinds
    for p in dash["panels"]:
        assert p["targets"] and all("ray_maverick_" in t["expr"] for t in p["targets"]), p["title"]


def test_dashboard_queries_name_defined_series_and_chart_recovery():
    from ray.util.metrics import Histogram

    from maverick_ray.metrics import _define

    defs = _define()
    defined = set()
    for f in dataclasses.fields(defs):
        metric = getattr(defs, f.name)
        name = "ray_" + metric.info["name"]  # Ray's exporter adds the prefix
        defined |= {name + s for s in ("_bucket", "_sum", "_count")} if isinstance(metric, Histogram) else {name}
    dash = json.loads((K8S / "grafana-dashboard.json").read_text())
    queries = dashboard_exprs() + [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    named = {n for q in queries for n in re.findall(r"ray_maverick_[a-z_]+", q)}
    assert named <= defined, f"the dashboard queries series no metric defines: {sorted(named - defined)}"
    assert {"ray_maverick_" + s for s in RECOVERY_SERIES} <= named
    assert all('replica=~"$replica"' in e for e in dashboard_exprs())
