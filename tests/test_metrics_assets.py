"""The Grafana ConfigMap carries exactly the dashboard JSON, and every panel queries our series."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

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
