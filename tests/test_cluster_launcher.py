"""cluster/ray-up-aws-gpu.yaml: valid for Ray's cluster launcher and consistent with the GPU Serve config."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "cluster" / "ray-up-aws-gpu.yaml"


def load() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_validates_against_rays_cluster_launcher_schema():
    import json

    import jsonschema
    import pytest
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load()
    jsonschema.validate(config, schema)                       # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))    # what `ray up` checks after merging defaults
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu8"]["min_wokers"] = 2  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_gpus_and_ports_match_the_serve_config_it_deploys():
    config = load()
    serve = yaml.safe_load((ROOT / "configs" / "maverick-gpu.yaml").read_text())
    app = serve["applications"][0]["args"]
    gpu_nodes = config["available_node_types"]["gpu8"]
    assert gpu_nodes["node_config"]["InstanceType"] == "p5en.48xlarge"  # 8 H200s per node (the config is sized for them)
    gpus_per_replica = app["ep_size"] * app["num_gpus_per_worker"]
    assert gpu_nodes["min_workers"] * 8 >= gpus_per_replica
    assert "configs/maverick-gpu.yaml" in LAUNCHER.read_text()
    assert config["file_mounts"]["/home/ray/maverick-ray"] == "."
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--num-gpus=0" in head and "--head" in head and "--dashboard-host=0.0.0.0" in head
    for cmd in (head, workers):
        assert "--metrics-export-port=8080" in cmd  # what the PodMonitor/Prometheus scrape
    assert "$RAY_HEAD_IP:6379" in workers
    assert any(app["model"] in c for c in config["setup_commands"])  # the checkpoint the config loads
