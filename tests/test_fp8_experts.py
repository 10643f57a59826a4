"""FP8 routed experts (model/fp8_experts.py) on CPU: per-token activation quantization, the
row-wise scaled FP8 GEMM, the experts block, and a whole model against transformers'
FP8 simulation. torch's CPU build has _scaled_mm, so the GPU path's math runs here too
(tests/test_gpu_fp8.py runs it on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maverick_ray.config import EngineConfig, ModelConfig
from maverick_ray.model.fp8_experts import FP8, FP8_MAX, Fp8Experts, quantize_rows, scaled_mm

from engine_helpers import prompts_for
from fp8_helpers import fp8_expert_worker, hf_logits, prefill_logits, write_fp8


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory) -> Path:
    return write_fp8(tmp_path_factory.mktemp("fp8"))


def _fp8_weight(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=g) / k ** 0.5
    s = w.abs().amax(dim=1) / FP8_MAX
    return (w / s[:, None]).to(FP8), s


def test_quantize_rows_uses_one_scale_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g) * torch.logspace(-3, 2, 7)[:, None]   # rows of very different size
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.shape == (7, 1)
    assert torch.allclose(s[:, 0], x.abs().amax(dim=1) / FP8_MAX)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((7,), FP8_MAX))   # each row's max hits 448
    err = (q.float() * s - x).abs() / x.abs().amax(dim=1, keepdim=True)
    assert err.max() <= 2 ** -4 + 1e-6   # e4m3: 3 mantissa bits, half a step relative to the row max


def test_scaled_mm_applies_both_scales():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=g)
    w_q, w_s = _fp8_weight(48, 64, g)
    x_q, x_s = quantize_rows(x)
    want = (x_q.float() * x_s) @ (w_q.float() * w_s[:, None]).T
    got = scaled_mm(x_q, x_s, w_q, w_s)
    assert got.dtype == torch.float32   # CPU: fp32 out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got16 = scaled_mm(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16).float()   # what CUDA writes
    torch.testing.assert_close(got16, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert (got - (x @ (w_q.float() * w_s[:, None]).T)).abs().max() > 0   # the activations were quantized


def test_fp8_experts_route_each_row_through_its_own_expert():
    g = torch.Generator().manual_seed(2)
    El, C, inter = 3, 32, 16
    ex = Fp8Experts(El, C, inter)
    for e in range(El):
        ex.gate_up_proj[e], ex.gate_up_proj_scale[e] = _fp8_weight(2 * inter, C, g)
        ex.down_proj[e], ex.down_proj_scale[e] = _fp8_weight(C, inter, g)
    x = torch.randn(9, C, generator=g)
    ids = torch.tensor([2, 0, 2, 1, 0, 0, 2, 1, 2])
    out = ex(x, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    for r in range(9):   # the legend's math, row by row, in fp32
        e = int(ids[r])
        wg = ex.gate_up_proj[e].float() * ex.gate_up_proj_scale[e][:, None]
        wd = ex.down_proj[e].float() * ex.down_proj_scale[e][:, None]
        xq, xs = quantize_rows(x[r:r + 1])
        gate, up = ((xq.float() * xs) @ wg.T).chunk(2, dim=-1)
        aq, as_ = quantize_rows(F.silu(gate) * up)
        want = (aq.float() * as_) @ wd.T
        torch.testing.assert_close(out[r:r + 1], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert ex(x[:0], ids[:0]).shape == (0, C)


def test_fp8_experts_in_the_model_track_the_dequantized_reference(fp8_ckpt):
    """The whole model with FP8 experts (per-token activation scales) against transformers on
    the dequantized FP8 weights. The gap is the activation quantization only: small, not zero.
    (transformers' own FP8 simulation, its default load, is no reference here: its "token"
    strategy reduces over every dim but the first two, so on the 2-D inputs the per-expert
    Linears get it uses one scale per tensor, not per token.)"""
    prompt = prompts_for(fp8_ckpt)[2]
    deq = hf_logits(fp8_ckpt, prompt, dequantize=True)
    w = fp8_expert_worker(fp8_ckpt, EngineConfig(device="cpu", dtype="float32", max_num_seqs=1))
    got = prefill_logits(w.model, prompt, w.device)
    cos = F.cosine_similarity(got, deq, dim=-1)
    assert cos.median() > 0.999 and (cos > 0.99).float().mean() >= 0.9, f"cosines {cos}"
    assert (got.argmax(-1) == deq.argmax(-1)).float().mean() >= 0.85
    assert (got - deq).abs().max() > 1e-3   # the activations really went through FP8
    assert ModelConfig.from_pretrained(fp8_ckpt).text.num_local_experts == w.model.moe_blocks[0].experts.num_local


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_fp8_experts_are_dequantized_on_cpu_unless_asked(fp8_ckpt, mode):
    """auto keeps FP8 experts only on GPUs with FP8 matmuls; on this CPU it dequantizes, like off."""
    from maverick_ray.engine.worker import RankWorker
    from maverick_ray.model.moe import Experts
    from maverick_ray.parallel.placement import ExpertPlacement

    experts = ModelConfig.from_pretrained(fp8_ckpt).text.num_local_experts
    w = RankWorker(fp8_ckpt, 0, ExpertPlacement.contiguous(experts, 1),
                   EngineConfig(device="cpu", dtype="float32", max_num_seqs=1, fp8_experts=mode))
    assert not w.fp8_experts and isinstance(w.model.moe_blocks[0].experts, Experts)
    fp8 = fp8_expert_worker(fp8_ckpt, EngineConfig(device="cpu", dtype="float32", max_num_seqs=1))
    # fp32 weights (4 bytes) against FP8 ones (1 byte) plus one fp32 scale per output row
    assert 3.5 < w.routed_expert_bytes() / fp8.routed_expert_bytes() < 4


def test_engine_decodes_with_fp8_experts_like_the_fp8_model_prefill(fp8_ckpt):
    """The engine with fp8_experts on (slot order, paged KV decode, the FP8 experts each step):
    each greedy token is the argmax the same FP8 model gives when it prefills prompt + output."""
    from maverick_ray.config import ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    engine = EngineConfig(device="cpu", dtype="float32", max_num_seqs=2, max_model_len=256, fp8_experts="on")
    prompts = prompts_for(fp8_ckpt)[:2]
    with Engine(fp8_ckpt, ParallelConfig(ep_size=1), engine) as eng:
        outs = [eng.generate(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))["token_ids"]
                for p in prompts]
    w = fp8_expert_worker(fp8_ckpt, engine)
    for p, out in zip(prompts, outs):
        logits = prefill_logits(w.model, p + out, w.device)     # (T, V)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == out
