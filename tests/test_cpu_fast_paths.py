"""CPU inference fast paths give the plain torch results: grouped experts writing in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maverick_ray.model.moe import Experts


def make_experts(n_local=12, C=32, inter=48, seed=0):
    torch.manual_seed(seed)
    ex = Experts(n_local, C, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1)
        ex.down_proj.normal_(0, 0.1)
    return ex


def reference(ex, x, ids):
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        gate, up = (x[r:r + 1] @ ex.gate_up_proj[ids[r]]).chunk(2, -1)
        out[r] = ((F.silu(gate) * up) @ ex.down_proj[ids[r]])[0]
    return out


@pytest.mark.parametrize("rows", [80, 6])  # prefill-sized, and decode-sized (about a row per expert)
def test_grouped_experts_agree_with_row_by_row_reference(rows):
    ex = make_experts()
    x, ids = torch.randn(rows, 32), torch.randint(0, 12, (rows,))
    with torch.no_grad():
        got = ex(x, ids)
    assert torch.allclose(got, reference(ex, x, ids), atol=1e-5)


@pytest.mark.parametrize("rows", [80, 6])
def test_output_major_experts_keep_values_and_results(rows):
    ex = make_experts()
    x, ids = torch.randn(rows, 32), torch.randint(0, 12, (rows,))
    before = {k: v.clone() for k, v in ex.state_dict().items()}
    with torch.no_grad():
        want = ex(x, ids)
        ex.fuse_projections()
        ex.fuse_projections()  # idempotent
        got = ex(x, ids)
    after = ex.state_dict()
    assert all(torch.equal(after[k], before[k]) and after[k].shape == before[k].shape for k in before)
    assert ex.gate_up_proj.transpose(1, 2).is_contiguous() and ex.down_proj.transpose(1, 2).is_contiguous()
    assert torch.allclose(got, want, atol=1e-5)


def test_experts_keep_autograd_outside_inference():
    ex = make_experts()
    x, ids = torch.randn(6, 32, requires_grad=True), torch.randint(0, 12, (6,))
    out = ex(x, ids)  # grad mode: the serial path without out= writes
    out.sum().backward()
    assert x.grad is not None and ex.down_proj.grad is not None
    with torch.no_grad():
        assert torch.allclose(out, reference(ex, x, ids), atol=1e-5)


def test_worker_gives_the_same_tokens_whatever_the_order_of_the_plan(tiny_ckpt):
    """A plan listing its sequences in another order (and their pages elsewhere in the pool)
    gives the same tokens."""
    from maverick_ray.config import EngineConfig
    from maverick_ray.engine.sampling import SamplingParams
    from maverick_ray.engine.step_types import RankPlan
    from maverick_ray.engine.worker import RankWorker
    from maverick_ray.parallel.placement import ExpertPlacement

    from engine_helpers import paged_work, worker_tables

    prompts = {"a": [5, 6, 7], "b": [8, 9], "c": [10, 11, 12, 13], "d": [14]}
    runs = {}
    w = RankWorker(tiny_ckpt, 0, ExpertPlacement.contiguous(16, 1), EngineConfig(max_model_len=64))
    for order in (["a", "b", "c", "d"], ["c", "a", "d", "b"]):
        tables = worker_tables(w, reverse=order[0] == "c")
        params = SamplingParams(max_tokens=6, temperature=0)
        work = [paged_work(tables, s, 0, prompts[s], params) for s in order]
        got = {s: [] for s in order}
        for _ in range(6):
            tokens = w.step(RankPlan(work=work)).tokens
            for s in order:
                got[s].append(tokens[s])
            work = [paged_work(tables, s, len(prompts[s]) + len(got[s]) - 1, [got[s][-1]]) for s in order]
        runs[tuple(order)] = got
    first, second = runs.values()
    assert first == second


def test_nope_layers_share_one_temperature_scale_per_forward_and_decode_keeps_row_order(monkeypatch):
    """Eight layers (two NoPE layers, floor_scale small enough that the scale varies with the
    position): the per-position temperature scale is made once per forward and shared; logits
    equal transformers' for a prefill and a decode step (whose rows are already one per sequence)."""
    from hf_reference import hf_text_model, ours_from_hf

    from maverick_ray.model import attention
    from maverick_ray.model.batch import ForwardBatch
    from maverick_ray.model.kv_cache import PagedKVCache

    hf, d = hf_text_model({"num_hidden_layers": 8, "floor_scale": 2})
    ours = ours_from_hf(hf, d)
    calls = []
    plain = attention.temperature_scale
    monkeypatch.setattr(attention, "temperature_scale", lambda *a: calls.append(1) or plain(*a))
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        want = hf(ids).logits                                             # (2, 9, V)
        cache = PagedKVCache.for_sequences(ours.cfg, 2, 16)
        prefill = ForwardBatch.build([0, 0], [8, 8])
        got_prefill = ours(ids[:, :8].reshape(-1), batch=prefill, cache=cache)  # (2, V) last tokens
        assert len(calls) == 1
        got_decode = ours(ids[:, 8], batch=ForwardBatch.build([8, 8], [1, 1]), cache=cache)
        assert len(calls) == 2
    assert torch.allclose(got_prefill, want[:, 7], atol=1e-4)
    assert torch.allclose(got_decode, want[:, 8], atol=1e-4)


def test_phase_timing_hooks_report_each_phase_and_come_off(tiny_ckpt):
    """bench_engine times a plain pass, then an instrumented one: the hooks report every phase of
    the tiny model (which has dense and MoE layers), enabling twice does not double them, and
    disabling leaves steps with no phase times."""
    from maverick_ray.config import EngineConfig
    from maverick_ray.engine.sampling import SamplingParams
    from maverick_ray.engine.step_types import RankPlan
    from maverick_ray.engine.worker import RankWorker
    from maverick_ray.parallel.placement import ExpertPlacement

    from engine_helpers import paged_work, worker_tables

    w = RankWorker(tiny_ckpt, 0, ExpertPlacement.contiguous(16, 1), EngineConfig(max_model_len=64))
    params = SamplingParams(max_tokens=4, temperature=0)
    w.enable_phase_timing()
    hooks = len(w._profile_hooks)
    w.enable_phase_timing()
    assert len(w._profile_hooks) == hooks > 0
    tables = worker_tables(w)
    timed = w.step(RankPlan(work=[paged_work(tables, "a", 0, [5, 6, 7], params)]))
    assert set(timed.phase_seconds) == {"attention", "experts", "shared_expert", "dense_mlp"}
    assert all(v > 0 for v in timed.phase_seconds.values()) and sum(timed.phase_seconds.values()) < timed.step_seconds
    decode = w.step(RankPlan(work=[paged_work(tables, "a", 3, [timed.tokens["a"]])]))
    assert set(decode.phase_seconds) == {"decode_layer"} and w.native_decode_layers == 4   # whole native layers
    w.disable_phase_timing()
    plain = w.step(RankPlan(work=[paged_work(tables, "a", 4, [decode.tokens["a"]])]))
    assert plain.phase_seconds == {} and not w._profile_hooks
    assert all(layer.decode_kernel is not None and layer.decode_kernel.phase is None
               for layer in w.model.model.layers)
