"""The real FP8 Maverick layout, planned without weights: a synthetic 84-shard checkpoint of
safetensors headers over sparse files (experts one Linear each, F8_E4M3 with an F32 (N, 1)
weight_scale, everything else BF16) and the release's config.json. Each EP rank plans to read
exactly the bytes `maverick-ray plan` counts for it: the dense weights and its own experts,
scales included, and no other rank's."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from maverick_ray.checkpoint.loader import weight_map
from maverick_ray.checkpoint.names import TEXT_PREFIX, expected_text_tensors, is_routed_expert, split_expert_names
from maverick_ray.checkpoint.read_plan import plan_reads
from maverick_ray.parallel.placement import ExpertPlacement
from maverick_ray.plan import Cluster, load_config, make_plan

SIZES = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def _tensors(cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """On-disk name -> (dtype, shape) in the FP8 release's layout."""
    out = {}
    for name, shape in expected_text_tensors(cfg.text).items():
        if not is_routed_expert(name):
            out[TEXT_PREFIX + name] = ("BF16", shape)
            continue
        E = shape[0]
        for e in range(E):
            split = split_expert_names(TEXT_PREFIX + name, e)
            parts = {"gate_proj": (shape[2] // 2, shape[1]), "up_proj": (shape[2] // 2, shape[1])} \
                if name.endswith("gate_up_proj") else {"down_proj": (shape[2], shape[1])}
            for part, (n, k) in parts.items():
                out[split[part]] = ("F8_E4M3", (n, k))
                out[split[part] + "_scale"] = ("F32", (n, 1))
    return out


def _write_sparse(root: Path, tensors, shards: int) -> None:
    names = list(tensors)
    per = -(-len(names) // shards)
    wm = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names[k * per:(k + 1) * per]:
            dtype, shape = tensors[n]
            size = SIZES[dtype]
            for d in shape:
                size *= d
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            wm[n] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    cfg, _, path = load_config("maverick-fp8")
    root = tmp_path_factory.mktemp("maverick_fp8")
    _write_sparse(root, _tensors(cfg), 84)
    shutil.copy(path, root / "config.json")
    return root, cfg


@pytest.mark.parametrize("ep", [8, 16])
def test_each_fp8_rank_reads_the_planned_bytes_and_only_its_experts(fp8_release, ep):
    root, cfg = fp8_release
    wm = weight_map(root)
    E = cfg.text.num_local_experts
    placement = ExpertPlacement.contiguous(E, ep)
    plan = make_plan("maverick-fp8", Cluster(gpus=8, nodes=ep // 8, gpu_memory_gib=80))
    expert_bytes = []
    for rank in (0, ep - 1):
        mine = placement.experts_of(rank)
        rp = plan_reads(root, cfg, wm, mine, include_vision=False)
        experts = [r for r in rp.reads if r.expert is not None]
        assert {r.expert for r in experts} == set(mine)
        assert sum(r.kind == "scale" for r in experts) * 2 == len(experts)   # a scale per FP8 weight
        assert rp.total_bytes == plan.rank_dense + len(mine) * plan.weights.per_expert
        expert_bytes.append(sum(r.nbytes for r in experts))
    assert expert_bytes[0] == expert_bytes[1] == E // ep * plan.weights.per_expert
