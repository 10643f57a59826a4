"""k8s/ manifests validate against KubeRay's CRD schema, Kubernetes' API models and Ray Serve's schema."""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# KubeRay's RayService CRD (ray-project/kuberay, ray-operator/config/crd/bases, commit feeaf72,
# Apache-2.0), kept with the tests so a clone validates on its own.
SCHEMAS = ROOT / "tests" / "schemas"
RAYSERVICES = [K8S / "rayservice-maverick-gpu.yaml", K8S / "tiny" / "rayservice-tiny-cpu.yaml"]
# Labels KubeRay puts on every Ray pod (ray-operator utils: RayNodeLabelKey, RayNodeTypeLabelKey, ...).
KUBERAY_POD_LABELS = [{"ray.io/is-ray-node": "yes", "ray.io/node-type": t, "ray.io/cluster": "maverick",
                       "ray.io/group": g} for t, g in (("head", "headgroup"), ("worker", "gpu-8x"))]


def crd_text(name: str) -> str:
    import gzip

    return gzip.decompress((SCHEMAS / (name + ".gz")).read_bytes()).decode()


@functools.lru_cache
def crd(name: str) -> dict:
    """The kept CRD, parsed once per session (a ~1 MB YAML: seconds to parse; read, never changed)."""
    return yaml.safe_load(crd_text(name))


def crd_schema(name: str) -> dict:
    return next(v for v in crd(name)["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def test_kept_crd_is_kuberays_rayservice_crd():
    kept = crd("ray.io_rayservices.yaml")
    assert kept["kind"] == "CustomResourceDefinition" and kept["spec"]["names"]["kind"] == "RayService"


def strict_unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Field names the schema does not define (jsonschema alone allows them in CRD schemas)."""
    errors = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            errors += [f"{path}.{k}" for k in obj if k not in props]
        for k, v in obj.items():
            sub = (props or {}).get(k) or (schema.get("additionalProperties")
                                           if isinstance(schema.get("additionalProperties"), dict) else None)
            if sub:
                errors += strict_unknown_fields(v, sub, f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            errors += strict_unknown_fields(v, schema["items"], f"{path}[{i}]")
    return errors


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice_validates_against_kuberay_crd(path):
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    schema = crd_schema("ray.io_rayservices.yaml")
    jsonschema.Draft7Validator(schema).validate(doc)
    assert strict_unknown_fields(doc, schema) == []
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"


SERVE_CONFIGS = RAYSERVICES + sorted((ROOT / "configs").glob("*.yaml"))


def serve_config(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    return yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_v2_is_a_valid_serve_deploy_config(path):
    from ray.serve.schema import ServeDeploySchema

    from maverick_ray.serve.settings import ServeSettings

    parsed = ServeDeploySchema.model_validate(serve_config(path))
    for app in parsed.applications:
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        settings = ServeSettings.from_args(app.args)
        bundles = settings.placement_group_bundles()
        deployment = app.deployments[0].model_dump(exclude_unset=True)
        assert deployment["placement_group_bundles"] == bundles, "bundles must be the replica + one per EP rank"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_bounds_the_queue_and_orders_the_time_limits(path):
    """Serve's queue is bounded with a Retry-After equal to the engine's own 503s'; the engine's
    request deadline comes first, a stopping replica waits it out, Serve's HTTP timeout is last."""
    from maverick_ray.serve.settings import ServeSettings

    cfg = serve_config(path)
    app = cfg["applications"][0]
    settings = ServeSettings.from_args(app["args"])
    deployment = app["deployments"][0]
    assert deployment["max_queued_requests"] > 0
    assert deployment["backpressure_config"]["retry_after_s"] == settings.retry_after_s > 0
    deadline = settings.engine().request_deadline_s
    assert 0 < deadline <= deployment["graceful_shutdown_timeout_s"] < cfg["http_options"]["request_timeout_s"]
    assert 0 < deployment["graceful_shutdown_wait_loop_s"] < deployment["graceful_shutdown_timeout_s"]


def test_gpu_rayservice_fits_its_worker_pods():
    doc = yaml.safe_load(RAYSERVICES[0].read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ep = serve_cfg["applications"][0]["args"]["ep_size"]
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in workers)
    assert gpus >= ep, f"EP={ep} needs {ep} GPUs; the worker groups have {gpus}"
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice_enables_kuberay_autoscaling_with_bounded_worker_groups(path):
    rc = yaml.safe_load(path.read_text())["spec"]["rayClusterConfig"]
    assert rc.get("enableInTreeAutoscaling") is True, "KubeRay must run its autoscaler to add pods for new replicas"
    options = rc["autoscalerOptions"]
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    assert {"requests", "limits"} <= set(options["resources"]), "size the autoscaler sidecar"
    assert rc["workerGroupSpecs"]
    for g in rc["workerGroupSpecs"]:
        assert {"minReplicas", "replicas", "maxReplicas"} <= set(g), f"{g['groupName']}: set all three explicitly"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']}: the autoscaler has no room to add pods"


def cpu_cores(quantity) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 2) in cores."""
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_node_resources(group: dict) -> dict[str, float]:
    """The CPUs and GPUs Ray advertises on one pod of a head or worker group, as KubeRay sets them:
    the group's `resources` map, else rayStartParams num-cpus / num-gpus, else the Ray container's
    (the first one's) limits (CPU rounded up, as KubeRay does; requests without a limit)."""
    params = group.get("rayStartParams", {})
    override = group.get("resources") or {}
    res = group["template"]["spec"]["containers"][0].get("resources", {})
    limits, requests_ = res.get("limits", {}), res.get("requests", {})
    if "CPU" in override:
        cpu = float(override["CPU"])
    elif "num-cpus" in params:
        cpu = float(params["num-cpus"])
    else:
        cpu = math.ceil(cpu_cores(limits.get("cpu", requests_.get("cpu", 0))))
    if "GPU" in override:
        gpu = float(override["GPU"])
    elif "num-gpus" in params:
        gpu = float(params["num-gpus"])
    else:
        gpu = sum(float(v) for k, v in limits.items() if k.endswith("gpu"))
    return {"CPU": cpu, "GPU": gpu}


def nodes_at(doc, size: str) -> list[dict[str, float]]:
    """Ray's nodes (head first) with every worker group at `size` ("minReplicas", "maxReplicas")."""
    rc = doc["spec"]["rayClusterConfig"]
    nodes = [ray_node_resources(rc["headGroupSpec"])]
    for g in rc["workerGroupSpecs"]:
        nodes += [ray_node_resources(g) for _ in range(g[size] * g.get("numOfHosts", 1))]
    return nodes


def replica_demands(doc, replicas: str) -> list[tuple[list[dict], str]]:
    """(bundles, placement strategy) of every Serve replica when each deployment runs its
    autoscaling_config's `replicas` ("min_replicas", "max_replicas")."""
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    out = []
    for app in serve_cfg["applications"]:
        for d in app["deployments"]:
            opts = d.get("ray_actor_options", {})
            bundles = d.get("placement_group_bundles") or [{"CPU": opts.get("num_cpus", 1),
                                                            "GPU": opts.get("num_gpus", 0)}]
            n = d["autoscaling_config"][replicas] if "autoscaling_config" in d else d.get("num_replicas", 1)
            out += [(bundles, d.get("placement_group_strategy", "PACK"))] * n
    return out


def unplaced_bundles(nodes: list[dict], replicas: list[tuple[list[dict], str]]) -> list[dict]:
    """First-fit-decreasing placement of the replicas' bundles onto the nodes; returns the bundles
    that found no room (empty: they fit). STRICT_PACK keeps a replica's bundles on one node and
    STRICT_SPREAD on distinct nodes; PACK and SPREAD are soft and constrain nothing."""
    free = [dict(n) for n in nodes]

    def fits(node, bundle):
        return all(node.get(k, 0) >= v for k, v in bundle.items() if v)

    def take(node, bundle):
        for k, v in bundle.items():
            node[k] = node.get(k, 0) - v

    def size(bundle):
        return (bundle.get("GPU", 0), bundle.get("CPU", 0))

    left = []
    for bundles, strategy in sorted(replicas, key=lambda r: [size(b) for b in r[0]], reverse=True):
        if strategy == "STRICT_PACK":
            bundles = [{k: sum(b.get(k, 0) for b in bundles) for k in {k for b in bundles for k in b}}]
        used = set()
        for bundle in sorted(bundles, key=size, reverse=True):
            node = next((i for i, n in enumerate(free) if fits(n, bundle)
                         and not (strategy == "STRICT_SPREAD" and i in used)), None)
            if node is None:
                left.append(bundle)
            else:
                take(free[node], bundle)
                used.add(node)
    return left


def totals(items: list[dict]) -> dict[str, float]:
    return {k: sum(i.get(k, 0) for i in items) for k in ("CPU", "GPU")}


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_worker_groups_at_max_hold_serve_max_replicas(path):
    """KubeRay's autoscaler only adds pods up to maxReplicas: at that size the cluster (workers, and
    the head's CPUs/GPUs when it offers any to Ray) must hold every deployment at its
    autoscaling max_replicas, each replica with all its placement_group_bundles."""
    doc = yaml.safe_load(path.read_text())
    nodes, replicas = nodes_at(doc, "maxReplicas"), replica_demands(doc, "max_replicas")
    need = totals([b for bundles, _ in replicas for b in bundles])
    have = totals(nodes)
    assert have["CPU"] >= need["CPU"] and have["GPU"] >= need["GPU"], (
        f"{path.name}: max_replicas engines need {need}; worker groups at maxReplicas + head give {have}")
    assert unplaced_bundles(nodes, replicas) == [], f"{path.name}: the bundles do not pack onto the pods"


def test_capacity_check_catches_a_worker_group_too_small():
    for path in RAYSERVICES:
        doc = yaml.safe_load(path.read_text())
        for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            g["maxReplicas"] = g["minReplicas"]
        nodes, replicas = nodes_at(doc, "maxReplicas"), replica_demands(doc, "max_replicas")
        assert unplaced_bundles(nodes, replicas), f"{path.name}: min-size groups should not hold max_replicas"
    one_gpu_node = [{"CPU": 64, "GPU": 8}]
    assert unplaced_bundles(one_gpu_node, [([{"CPU": 1, "GPU": 1}] * 2, "STRICT_SPREAD")])
    assert unplaced_bundles([{"CPU": 2}, {"CPU": 2}], [([{"CPU": 1}] * 3, "STRICT_PACK")])
    assert not unplaced_bundles([{"CPU": 2}, {"CPU": 2}], [([{"CPU": 1}] * 3, "SPREAD")])
    assert ray_node_resources({"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [
        {"resources": {"limits": {"cpu": "8"}}}]}}}) == {"CPU": 0, "GPU": 0}
    assert ray_node_resources({"rayStartParams": {}, "template": {"spec": {"containers": [
        {"resources": {"limits": {"cpu": "1500m", "nvidia.com/gpu": "8"}}}]}}}) == {"CPU": 2, "GPU": 8}


def pod_templates(doc) -> list[dict]:
    rc = doc["spec"]["rayClusterConfig"]
    return [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]


def k8s_model_errors(obj, model: str) -> list[str]:
    """Strict check of a core object against the kubernetes client's API models: unknown fields and
    wrong primitive types are errors (the client's own deserializer silently drops unknown fields)."""
    import kubernetes.client.models as m

    cls = getattr(m, model)
    attrs = {v: (k, t) for k, (t) in ((k, cls.openapi_types[k]) for k in cls.openapi_types)
             for v in [cls.attribute_map[k]]}
    errors = []
    for key, value in obj.items():
        if key not in attrs:
            errors.append(f"{model}.{key}: unknown field")
            continue
        _, typ = attrs[key]
        if typ.startswith("list["):
            inner = typ[5:-1]
            if not isinstance(value, list):
                errors.append(f"{model}.{key}: expected a list")
            elif hasattr(m, inner):
                for v in value:
                    errors += k8s_model_errors(v, inner)
        elif typ.startswith("dict("):
            if not isinstance(value, dict):
                errors.append(f"{model}.{key}: expected a map")
        elif hasattr(m, typ):
            if not isinstance(value, dict):
                errors.append(f"{model}.{key}: expected an object")
            else:
                errors += k8s_model_errors(value, typ)
        elif typ == "str" and not isinstance(value, str):
            errors.append(f"{model}.{key}: expected a string")
        elif typ == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            errors.append(f"{model}.{key}: expected an integer")
        elif typ == "bool" and not isinstance(value, bool):
            errors.append(f"{model}.{key}: expected a boolean")
    return errors


CORE = {"PersistentVolumeClaim": "V1PersistentVolumeClaim", "ConfigMap": "V1ConfigMap"}


def test_core_objects_and_pod_templates_match_kubernetes_models():
    files = [K8S / "checkpoint-pvc.yaml", K8S / "monitoring" / "grafana-dashboard-configmap.yaml"]
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert k8s_model_errors(doc, CORE[doc["kind"]]) == [], f
    for path in RAYSERVICES:
        for template in pod_templates(yaml.safe_load(path.read_text())):
            assert k8s_model_errors(template, "V1PodTemplateSpec") == [], path
    assert k8s_model_errors({"spec": {"containerz": []}}, "V1PodTemplateSpec"), "the checker must catch typos"


def selector_matches(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
    return True


def test_podmonitor_selects_ray_pods_and_their_metrics_port():
    pm = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    for labels in KUBERAY_POD_LABELS:
        assert selector_matches(pm["spec"]["selector"], labels), labels
    assert not selector_matches(pm["spec"]["selector"], {"app": "something-else"})
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    for path in RAYSERVICES:
        doc = yaml.safe_load(path.read_text())
        for template in pod_templates(doc):
            names = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert names.get(port) == 8080, f"{path.name}: no container port named {port!r} on 8080"
        rc = doc["spec"]["rayClusterConfig"]
        for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in rc["workerGroupSpecs"]]:
            assert params.get("metrics-export-port") == "8080"


def kustomization_files(root: Path) -> list[Path]:
    """The manifests a kustomization pulls in, under kustomize's default load restrictor: a
    resource is a file inside the kustomization's directory or another kustomization directory."""
    out = []
    for res in yaml.safe_load((root / "kustomization.yaml").read_text())["resources"]:
        target = (root / res).resolve()
        if target.is_dir():
            out += kustomization_files(target)
        else:
            assert target.is_file(), f"{root}: resource {res} does not exist"
            assert target.parent == root.resolve(), f"{root}: {res} is outside the kustomization (kustomize refuses it)"
            out.append(target)
    return out


KUSTOMIZATIONS = {"gpu": (K8S, {"RayService", "PodMonitor", "ConfigMap", "PersistentVolumeClaim"}),
                  "tiny": (K8S / "tiny", {"RayService", "PodMonitor", "ConfigMap"})}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_builds_the_whole_deployment(name):
    import shutil
    import subprocess

    root, kinds = KUSTOMIZATIONS[name]
    files = kustomization_files(root)
    assert {yaml.safe_load(f.read_text())["kind"] for f in files} == kinds
    kubectl = shutil.which("kubectl")
    if kubectl:  # the real kustomize, as `kubectl apply -k` runs it
        out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert {d["kind"] for d in yaml.safe_load_all(out.stdout)} == kinds
