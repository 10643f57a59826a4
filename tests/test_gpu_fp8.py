"""FP8 routed experts on CUDA: torch._scaled_mm with row-wise scales (per-token activations,
per-channel weights), against the CPU fp32 model on the same FP8 checkpoint dequantized.

Skips cleanly without a CUDA GPU that has FP8 matmuls (compute capability 8.9+, e.g. H100);
run with `.venv/bin/python -m pytest -q tests/test_gpu_fp8.py` on a GPU box.
Tolerances: bf16 activations plus FP8 activation quantization move logits by about 0.3 on the
tiny model (cosine about 0.9997 per token on CPU); a near-tie top-1 route may flip for a token,
so the bounds are on the median and on 90% of the tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maverick_ray.config import EngineConfig, ModelConfig
from maverick_ray.engine.worker import RankWorker
from maverick_ray.model.fp8_experts import FP8, Fp8Experts
from maverick_ray.parallel.placement import ExpertPlacement

from engine_helpers import prompts_for
from fp8_helpers import fp8_expert_worker, prefill_logits, write_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                       reason="FP8 matmuls need compute capability 8.9+ (Ada, Hopper)"),
]


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory) -> Path:
    return write_fp8(tmp_path_factory.mktemp("fp8"))


def test_fp8_experts_on_cuda_match_the_cpu_run():
    g = torch.Generator().manual_seed(0)
    El, C, inter = 4, 128, 64
    cpu = Fp8Experts(El, C, inter)
    cpu.gate_up_proj.copy_((torch.randn(El, 2 * inter, C, generator=g) * 8).to(FP8))
    cpu.gate_up_proj_scale.copy_(torch.rand(El, 2 * inter, generator=g) / 64 + 1e-3)
    cpu.down_proj.copy_((torch.randn(El, C, inter, generator=g) * 8).to(FP8))
    cpu.down_proj_scale.copy_(torch.rand(El, C, generator=g) / 64 + 1e-3)
    x = torch.randn(37, C, generator=g)
    ids = torch.randint(0, El, (37,), generator=g)
    want = cpu(x, ids)
    gpu = Fp8Experts(El, C, inter).cuda()
    gpu.load_state_dict(cpu.state_dict())
    got = gpu(x.cuda().bfloat16(), ids.cuda()).float().cpu()
    cos = F.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.995, f"min cosine {cos.min():.4f}"
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


def test_fp8_model_on_cuda_tracks_the_cpu_fp32_model(fp8_ckpt):
    prompt = prompts_for(fp8_ckpt)[2]
    cfg = ModelConfig.from_pretrained(fp8_ckpt)
    ref_worker = RankWorker(fp8_ckpt, 0, ExpertPlacement.contiguous(cfg.text.num_local_experts, 1),
                            EngineConfig(device="cpu", dtype="float32", max_num_seqs=1))
    ref = prefill_logits(ref_worker.model, prompt, ref_worker.device)            # dequantized at load
    w = fp8_expert_worker(fp8_ckpt, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=1))
    block = w.model.moe_blocks[0].experts
    assert isinstance(block, Fp8Experts) and block.gate_up_proj.dtype == FP8 and block.gate_up_proj.is_cuda
    got = prefill_logits(w.model, prompt, w.device)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.median() > 0.995 and (cos > 0.98).float().mean() >= 0.9, f"cosines {cos}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_engine_keeps_fp8_experts_on_the_gpu_by_default(fp8_ckpt):
    """fp8_experts=auto on an FP8-capable GPU: the engine's rank holds FP8 experts, and its greedy
    decode (paged KV, FP8 experts every step) agrees with the same rank's own full prefill."""
    from maverick_ray.config import ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    prompts = prompts_for(fp8_ckpt)[:2]
    engine = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=2, max_model_len=256)
    with Engine(fp8_ckpt, ParallelConfig(ep_size=1), engine) as eng:
        info = eng.ranks.call("info")[0]
        outs = [eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))["token_ids"]
                for p in prompts]
    assert info["fp8_experts"] and info["device"].startswith("cuda")
    w = fp8_expert_worker(fp8_ckpt, engine)
    agree = []
    for p, out in zip(prompts, outs):
        logits = prefill_logits(w.model, p + out, w.device)                       # (T, V)
        agree += (logits[len(p) - 1:-1].argmax(-1) == torch.tensor(out)).tolist()
    assert sum(agree) / len(agree) >= 0.9, f"decode vs prefill argmax agreement {agree}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="CUDA-graph decode needs grouped FP8 GEMMs (Hopper)")
def test_cuda_graph_decode_steps_with_fp8_experts(fp8_ckpt):
    """FP8 routed experts (torch._scaled_grouped_mm) inside captured decode graphs, against the
    ordinary forward on a twin cache (graph_helpers.twin_decode)."""
    from graph_helpers import twin_decode

    w = fp8_expert_worker(fp8_ckpt, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=6, max_model_len=256))
    assert w.fp8_experts
    out = twin_decode(w, capture=True, rtol=0.05, atol=0.1)
    assert out["stats"]["failed"] is None and out["stats"]["graphs"] >= 3
