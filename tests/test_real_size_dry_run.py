"""Real-size Maverick without real weights: the rank model on the meta device, and the loader's
read planning against synthetic safetensors files whose headers are real (names, shapes, shard
layout) and whose data is a sparse hole that is never read."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct

import pytest
import torch

from maverick_ray.checkpoint.loader import load_state_dict, weight_map
from maverick_ray.checkpoint.names import TEXT_PREFIX, expected_text_tensors, is_routed_expert, split_expert_names
from maverick_ray.checkpoint.read_plan import plan_reads, read_header
from maverick_ray.engine.kv_blocks import BlockTables, OutOfPages
from maverick_ray.engine.kv_budget import kv_pages
from maverick_ray.model.kv_cache import KVLayout, PagedKVCache
from maverick_ray.model.text import TextModel
from maverick_ray.parallel.placement import ExpertPlacement
from maverick_ray.plan import Cluster, Workload, load_config, make_plan
from maverick_ray.plan_output import serve_values
from maverick_ray.serve.settings import ServeSettings

C, I, E, MOE_LAYERS = 5120, 8192, 128, 24
EXPERT_BYTES = 2 * MOE_LAYERS * 3 * C * I          # one routed expert over every MoE layer, bf16


@pytest.fixture(scope="module")
def maverick():
    return load_config("maverick")[0]


@pytest.mark.parametrize("ep", [8, 16])
def test_meta_rank_model_bytes_equal_the_plan(maverick, ep):
    plan = make_plan("maverick", Cluster(gpus=8, nodes=ep // 8, gpu_memory_gib=141), Workload(max_model_len=4096))
    placement = ExpertPlacement.contiguous(E, ep)
    for rank in (0, ep - 1):
        with torch.device("meta"):
            model = TextModel(maverick.text, expert_ids=placement.experts_of(rank)).to(torch.bfloat16)
        experts = {id(p) for b in model.moe_blocks for p in b.experts.parameters()}
        routed = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in experts)
        dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
        assert routed == plan.rank_experts == (E // ep) * EXPERT_BYTES
        assert dense == plan.rank_dense


@pytest.mark.parametrize("length", [4096, 32768])
def test_meta_paged_kv_cache_is_the_plans(maverick, length):
    """The KV cache a rank builds from the plan's Serve args (engine/kv_budget.py, as
    RankWorker._new_cache does) on the meta device: its pages and bytes are the plan's, and its
    block tables hold the plan's sequences of max_model_len at once."""
    plan = make_plan("maverick", Cluster(gpus=8, gpu_memory_gib=141), Workload(max_model_len=length))
    engine = ServeSettings.from_args(serve_values(plan)["args"]).engine_config
    layout = KVLayout.from_config(maverick.text, engine.kv_block_size)
    pages = kv_pages(engine, maverick.text, layout, torch.bfloat16, torch.device("cuda"))
    assert pages == plan.kv_pages
    cache = PagedKVCache(layout, pages, torch.bfloat16, "meta")
    assert cache.nbytes == plan.kv_pages * plan.kv.page_bytes <= plan.kv_budget
    assert cache.nbytes > plan.kv_budget - 0.01 * 2**30 - plan.kv.page_bytes
    # 12 buffers (one per layer of a group) of K and V: pages x 16 rows of (8 kv heads, 128).
    assert len(cache.k) == len(cache.v) == 12 and cache.k[0].shape == (pages * 16, 8, 128)
    # Each sequence's last decode step (position length - 1): the global group reads every block,
    # the chunked groups the blocks of the chunk that position is in.
    tables = BlockTables(layout, pages)
    for i in range(plan.seqs_paged):
        tables.allocate(f"s{i}", length - 1, length)
    held = {tables.held(f"s{i}") for i in range(plan.seqs_paged)}
    chunk_blocks = ((length - 1) % 8192 + 1) // 16   # blocks of the current chunk up to the last token
    assert held == {length // 16 + 3 * chunk_blocks} and max(held) <= plan.kv_pages_per_seq
    if length <= 8192:   # one chunk: the plan's count is exact, and one more sequence does not fit
        assert held == {plan.kv_pages_per_seq}
        with pytest.raises(OutOfPages):
            tables.allocate("one-more", length - 1, length)


# ---- synthetic real-size checkpoints ----------------------------------------------------------
def _layer_key(name: str):
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def disk_tensors(cfg, layout: str) -> dict[str, tuple[int, ...]]:
    """On-disk name -> shape of every text tensor, experts fused or split (per expert, [out, in])."""
    out = {}
    for name, shape in expected_text_tensors(cfg.text).items():
        if not is_routed_expert(name):
            out[TEXT_PREFIX + name] = shape
        elif layout == "fused":
            out[TEXT_PREFIX + name] = shape
        else:
            for e in range(shape[0]):
                n = split_expert_names(TEXT_PREFIX + name, e)
                if name.endswith("gate_up_proj"):
                    out[n["gate_proj"]] = out[n["up_proj"]] = (shape[2] // 2, shape[1])
                else:
                    out[n["down_proj"]] = (shape[2], shape[1])
    return dict(sorted(out.items(), key=lambda kv: _layer_key(kv[0])))


def write_sparse_checkpoint(root, cfg, layout: str, num_shards: int):
    """config.json, an index and `num_shards` safetensors files (fewer when one tensor outgrows a
    shard) with real headers; the data is a hole (truncate), so nothing is written or read."""
    root.mkdir()
    tensors = disk_tensors(cfg, layout)
    sizes = {n: 2 * math.prod(s) for n, s in tensors.items()}
    target = sum(sizes.values()) / num_shards
    shards: list[list[str]] = [[]]
    filled = 0
    for name in tensors:
        if shards[-1] and filled + sizes[name] > target:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    wm = {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            header[n] = {"dtype": "BF16", "shape": list(tensors[n]), "data_offsets": [offset, offset + sizes[n]]}
            offset += sizes[n]
            wm[n] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": wm}))
    shutil.copy(load_config("maverick")[2], root / "config.json")
    return root, len(shards), sum(sizes.values())


@pytest.fixture(scope="module")
def sparse_ckpts(tmp_path_factory, maverick):
    base = tmp_path_factory.mktemp("real_size")
    return {"fused": write_sparse_checkpoint(base / "fused", maverick, "fused", 55),
            "split": write_sparse_checkpoint(base / "split", maverick, "split", 55)}


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("ep", [8, 16])
def test_each_rank_plans_to_read_only_its_own_experts(sparse_ckpts, maverick, layout, ep, capsys):
    root, shards, total = sparse_ckpts[layout]
    assert 40 <= shards <= 60 and 795e9 < total < 805e9
    wm = weight_map(root)
    headers = {f: read_header(root / f) for f in sorted(set(wm.values()))}
    placement = ExpertPlacement.contiguous(E, ep)
    plan = make_plan("maverick", Cluster(gpus=8, nodes=ep // 8, gpu_memory_gib=141))
    expert_ranges: list[tuple[str, int, int, int]] = []   # (file, start, stop, rank)
    per_rank = []
    for rank in range(ep):
        mine = placement.experts_of(rank)
        rp = plan_reads(root, maverick, wm, mine, include_vision=False)
        for r in rp.reads:
            entry = headers[r.file][r.disk]
            if not is_routed_expert(r.target):
                assert r.byte_ranges == ((entry.start, entry.end),)
                continue
            if layout == "fused":   # rows [first, last + 1) of the (128, ...) tensor, by hand
                row = 2 * math.prod(entry.shape[1:])
                want = ((entry.start + mine[0] * row, entry.start + (mine[-1] + 1) * row),)
                assert r.byte_ranges == want
            else:
                assert r.expert in mine and f".experts.{r.expert}." in r.disk
                assert r.byte_ranges == ((entry.start, entry.end),)
            expert_ranges += [(r.file, a, b, rank) for a, b in r.byte_ranges]
        # Bytes read = the dense weights + this rank's experts: the plan's figures (bf16, no vision).
        assert rp.total_bytes == plan.rank_dense + len(mine) * EXPERT_BYTES
        per_rank.append(rp.total_bytes)
    # Every expert byte is read by exactly one rank.
    expert_ranges.sort()
    for (f1, _, b1, _), (f2, a2, _, _) in zip(expert_ranges, expert_ranges[1:]):
        assert f1 != f2 or b1 <= a2, "two ranks read the same expert bytes"
    assert sum(b - a for _, a, b, _ in expert_ranges) == E * EXPERT_BYTES
    with capsys.disabled():
        print(f"\n{layout} layout, EP {ep}, {shards} shards: each rank reads {per_rank[0] / 2**30:.2f} GiB "
              f"({plan.rank_dense / 2**30:.2f} dense + {(per_rank[0] - plan.rank_dense) / 2**30:.2f} experts) "
              f"of {total / 2**30:.1f} GiB")


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_split_ckpt"])
def test_loader_reads_nothing_outside_the_plan(request, tmp_path, which):
    """Every byte of the checkpoint outside rank 1-of-4's planned ranges is overwritten with NaN
    bits; the rank's load still equals a clean load, so the loader read only planned bytes."""
    src = request.getfixturevalue(which)
    ck = shutil.copytree(src, tmp_path / "c")
    cfg = load_config(ck)[0]
    experts = ExpertPlacement.contiguous(cfg.text.num_local_experts, 4).experts_of(1)
    clean = load_state_dict(src, expert_ids=experts, progress=False)
    wm = weight_map(ck)
    rp = plan_reads(ck, cfg, wm, experts)
    for fname in set(wm.values()):
        keep = sorted((a, b) for r in rp.reads if r.file == fname for a, b in r.byte_ranges)
        data_start = 8 + struct.unpack("<Q", (ck / fname).read_bytes()[:8])[0]
        raw = bytearray((ck / fname).read_bytes())
        pos = data_start
        for a, b in keep + [(len(raw), len(raw))]:
            raw[pos:a] = b"\xff" * (a - pos)
            pos = max(pos, b)
        (ck / fname).write_bytes(bytes(raw))
    got = load_state_dict(ck, expert_ids=experts, progress=False)
    assert got.keys() == clean.keys()
    for k in clean:
        assert torch.equal(got[k], clean[k]), k
