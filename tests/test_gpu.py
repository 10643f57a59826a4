"""The GPU path: bf16 weights on CUDA, NCCL between ranks, one GPU per Ray worker.

Skips cleanly on machines without CUDA (CI has none); run on a GPU box with
`.venv/bin/python -m pytest -q tests/test_gpu.py` after installing a CUDA torch.
"""

from __future__ import annotations

import pytest
import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.engine.worker import RankWorker
from maverick_ray.parallel.placement import ExpertPlacement

from engine_helpers import greedy_reference, prompts_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prefill_logits(ckpt, engine: EngineConfig, prompt: list[int]) -> torch.Tensor:
    experts = ModelConfig.from_pretrained(ckpt).text.num_local_experts
    w = RankWorker(ckpt, 0, ExpertPlacement.contiguous(experts, 1), engine)
    with torch.no_grad():   # one prefill from position 0, no KV cache
        return w.model(torch.tensor(prompt, device=w.device), all_logits=True).float().cpu()


def test_bf16_on_cuda_tracks_fp32_on_cpu(tiny_ckpt):
    prompt = prompts_for(tiny_ckpt)[1]
    ref = prefill_logits(tiny_ckpt, EngineConfig(device="cpu", dtype="float32", max_num_seqs=1), prompt)
    got = prefill_logits(tiny_ckpt, EngineConfig(device="auto", dtype="auto", max_num_seqs=1), prompt)  # cuda, bf16
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99, f"bf16 logits drift from fp32: min cosine {cos.min():.4f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_engine_on_one_gpu_matches_the_cpu_model(tiny_ckpt):
    prompts = prompts_for(tiny_ckpt)
    want = greedy_reference(tiny_ckpt, prompts, 12, use_hf=False)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                    max_model_len=256)) as eng:
        assert [eng.generate(p, GREEDY)["token_ids"] for p in prompts] == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ep2_over_nccl_with_a_gpu_per_worker(tiny_ckpt):
    import ray

    from maverick_ray.ray_runtime import init_ray

    prompts = prompts_for(tiny_ckpt)
    want = greedy_reference(tiny_ckpt, prompts, 12, use_hf=False)
    init_ray("local", num_cpus=3)
    try:
        par = ParallelConfig(ep_size=2, num_gpus_per_worker=1, num_cpus_per_worker=1)
        with Engine(tiny_ckpt, par, EngineConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                 max_model_len=256)) as eng:
            assert [eng.generate(p, GREEDY)["token_ids"] for p in prompts] == want
            infos = eng.ranks.call("info")
            assert all(i["device"].startswith("cuda") for i in infos)
            assert eng.last_step.a2a_bytes and max(eng.last_step.a2a_bytes) > 0  # NCCL all-to-all moved tokens
    finally:
        ray.shutdown()


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="CUDA-graph decode needs the routed experts as grouped GEMMs (Hopper)")


@hopper
def test_cuda_graph_decode_steps_match_the_ordinary_forward(tiny_ckpt):
    """Decode steps captured in CUDA graphs per bucket and replayed (bf16), against the ordinary
    forward on a twin cache: logits within bf16 rounding of a differently shaped batch, the same
    argmax where the top two logits are apart, the same KV cache (graph_helpers.twin_decode)."""
    from graph_helpers import twin_decode

    experts = ModelConfig.from_pretrained(tiny_ckpt).text.num_local_experts
    w = RankWorker(tiny_ckpt, 0, ExpertPlacement.contiguous(experts, 1),
                   EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=6, max_model_len=256))
    out = twin_decode(w, capture=True, rtol=0.05, atol=0.1)
    assert out["stats"]["failed"] is None and out["stats"]["graphs"] >= 3
    assert out["stats"]["replays"] == 60


@hopper
def test_engine_replays_cuda_graphs_on_one_gpu(tiny_ckpt):
    """cuda_graphs=auto (the default) on one Hopper GPU: the rank captures decode graphs and
    replays them, and the greedy outputs agree with cuda_graphs=off (bf16: the first tokens
    exactly; later ones may part at a near-tie, since padded batches round differently)."""
    prompts = prompts_for(tiny_ckpt)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs, infos, stats = {}, {}, {}
    for mode in ("off", "auto"):
        cfg = EngineConfig(device="cuda", max_num_seqs=4, max_model_len=256, cuda_graphs=mode)
        with Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg) as eng:
            streams = [eng.add_request(p, greedy) for p in prompts]
            outs[mode] = [[ev.token_id for ev in s if ev.token_id is not None] for s in streams]
            outs[mode] += [eng.generate(prompts[0], greedy)["token_ids"]]
            infos[mode], stats[mode] = eng.ranks.call("info")[0], eng.ranks.call("decode_graph_stats")[0]
    assert not infos["off"]["cuda_graphs"] and infos["off"]["cuda_graphs_off"] == "cuda_graphs is off"
    assert infos["auto"]["cuda_graphs"], infos["auto"]["cuda_graphs_off"]
    assert stats["auto"]["graphs"] >= 2 and stats["auto"]["replays"] >= 2 * 23 and stats["auto"]["failed"] is None
    assert all(len(o) == 24 for o in outs["auto"])
    assert [o[:6] for o in outs["auto"]] == [o[:6] for o in outs["off"]], outs


def _expert_reference(xs, ids_sorted, gate_up, down):
    """fp32 per row: silu(x Wg) * (x Wu) @ Wd of its expert; gate_up (El, C, 2I), down (El, I, C)."""
    inter = gate_up.shape[2] // 2
    out = torch.empty(xs.shape[0], down.shape[2], device=xs.device)
    for e in ids_sorted.unique().tolist():
        rows = ids_sorted == e
        h = xs[rows].float() @ gate_up[e].float()
        out[rows] = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ down[e].float()
    return out


@pytest.mark.parametrize("rows", [1, 7, 40, 300])
def test_triton_expert_kernels_match_the_fp32_math(rows):
    """model/triton_experts.py on bf16 weights (El, C, 2I) and on FP8 output-major weights with
    per-channel scales: every row through its own expert, experts with no rows, groups longer than
    one 16-row tile, widths that are no multiple of the tiles."""
    tx = pytest.importorskip("maverick_ray.model.triton_experts")
    g = torch.Generator().manual_seed(rows)
    El, C, inter = 8, 320, 200
    ids = torch.randint(0, El, (rows,), generator=g)
    ids[ids == 3] = 4                                            # expert 3 gets no rows
    gate_up = (torch.randn(El, C, 2 * inter, generator=g) / C ** 0.5).cuda()
    down = (torch.randn(El, inter, C, generator=g) / inter ** 0.5).cuda()
    x = torch.randn(rows, C, generator=g).cuda()
    ids = ids.cuda()
    order = torch.argsort(ids, stable=True)
    xs, ids_sorted = x[order].bfloat16(), ids[order]
    from maverick_ray.model.moe import expert_row_bounds

    bounds = expert_row_bounds(ids, order, El)
    assert bounds.tolist() == [int((ids < e).sum()) for e in range(El + 1)]
    bf = tx.expert_rows(xs, bounds, gate_up.bfloat16(), down.bfloat16()).float()
    want = _expert_reference(xs, ids_sorted, gate_up.bfloat16(), down.bfloat16())
    assert (bf - want).norm() / want.norm() < 2e-2
    s13, s2 = gate_up.abs().amax(1) / 448, down.abs().amax(1) / 448                       # (El, 2I), (El, C)
    w13 = (gate_up / s13[:, None, :]).transpose(1, 2).contiguous().to(torch.float8_e4m3fn)  # (El, 2I, C)
    w2 = (down / s2[:, None, :]).transpose(1, 2).contiguous().to(torch.float8_e4m3fn)        # (El, C, I)
    f8 = tx.expert_rows(xs, bounds, w13, w2, s13, s2).float()
    want8 = _expert_reference(xs, ids_sorted, (w13.float() * s13[:, :, None]).transpose(1, 2),
                              (w2.float() * s2[:, :, None]).transpose(1, 2))
    assert (f8 - want8).norm() / want8.norm() < 2e-2


@hopper
def test_bf16_experts_run_triton_for_few_rows_and_grouped_gemms_beyond(monkeypatch):
    """Experts.forward (bf16, Hopper, inference): up to TRITON_MAX_ROWS_PER_EXPERT rows per expert
    in the Triton kernels, more in torch._grouped_mm; both agree with each other."""
    pytest.importorskip("maverick_ray.model.triton_experts")
    from maverick_ray.model import moe

    g = torch.Generator().manual_seed(0)
    ex = moe.Experts(16, 256, 128)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 256 ** -0.5, generator=g)
        ex.down_proj.normal_(0, 128 ** -0.5, generator=g)
    ex = ex.cuda().bfloat16()
    x = torch.randn(64, 256, generator=g).cuda().bfloat16()
    ids = torch.randint(0, 16, (64,), generator=g).cuda()
    calls = []
    real = moe._triton_module()
    assert real is not None and not moe._triton_failed
    with torch.inference_mode():
        monkeypatch.setattr(moe, "TRITON_MAX_ROWS_PER_EXPERT", 4)     # 64 rows over 16 experts: Triton
        monkeypatch.setattr(real, "expert_rows", lambda *a, f=real.expert_rows: calls.append(1) or f(*a))
        fast = ex(x, ids).float()
        monkeypatch.setattr(moe, "TRITON_MAX_ROWS_PER_EXPERT", 3)     # at most 48: grouped GEMMs
        grouped = ex(x, ids).float()
    assert calls == [1] and not moe._triton_failed
    assert (fast - grouped).norm() / grouped.norm() < 2e-2
