"""The native grouped-experts kernel (maverick_ray/native): same results as the torch path, used
only where it should be, and a clean fallback when it cannot be built (for it and the RMSNorm
kernel, tests/test_native_rms_norm.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from maverick_ray.config import EngineConfig
from maverick_ray.engine.worker import RankWorker
from maverick_ray.model.moe import Experts
from maverick_ray.native import build as native_build
from maverick_ray.native.grouped_experts import GroupedExperts, grouped_experts_kernel
from maverick_ray.parallel.placement import ExpertPlacement


@pytest.fixture(scope="module")
def kernel():
    k = grouped_experts_kernel()
    assert k is not None, "the kernel must build on the development and CI machines (gcc is installed)"
    return k


def fused_experts(n_local, C, inter, seed=0):
    torch.manual_seed(seed)
    ex = Experts(n_local, C, inter)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, C ** -0.5)
        ex.down_proj.normal_(0, inter ** -0.5)
    ex.fuse_projections()
    return ex


@pytest.mark.parametrize("n_local,C,inter,rows", [
    (16, 64, 64, 5),       # tiny checkpoint, a decode step
    (128, 512, 256, 32),   # mini checkpoint, 32 sequences decoding
    (3, 40, 24, 150),      # widths not multiples of the block; > 64 rows per expert (several passes)
    (8, 64, 64, 1),
    (5, 37, 19, 23),       # widths with a tail past whole 8-lane vectors; 1-3 rows left after 4-row tiles
    (2, 64, 48, 64),       # 32 rows per expert: whole 4-row tiles
    (4, 40, 36, 45),       # 9-14 rows per expert: tiles and the rows left after them
])
def test_kernel_matches_torch_path(kernel, n_local, C, inter, rows):
    ex = fused_experts(n_local, C, inter)
    x, ids = torch.randn(rows, C), torch.randint(0, n_local, (rows,))
    with torch.no_grad():
        want = ex(x, ids)  # no kernel attached: BLAS per expert group
        got = kernel(x, ids, ex.gate_up_proj, ex.down_proj)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()


def test_kernel_rejects_bad_ids_and_layouts(kernel):
    ex = fused_experts(4, 32, 16)
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        kernel(x, torch.tensor([0, 4, 1]), ex.gate_up_proj, ex.down_proj)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        kernel(x, torch.tensor([0, -1, 1]), ex.gate_up_proj, ex.down_proj)
    plain = Experts(4, 32, 16)  # checkpoint layout, not fused output-major
    assert not GroupedExperts.supports(plain.gate_up_proj, plain.down_proj)
    assert not plain.use_kernel(kernel) and plain.kernel is None
    with pytest.raises(ValueError, match="output-major"):
        kernel(x, torch.tensor([0, 1, 2]), plain.gate_up_proj.detach(), plain.down_proj.detach())


def test_experts_use_kernel_for_few_rows_and_blas_for_many(kernel):
    ex = fused_experts(8, 64, 32)
    calls = []

    class Spy:
        supports = staticmethod(kernel.supports)

        def __call__(self, *args):
            calls.append(args[0].shape[0])
            return kernel(*args)

    assert ex.use_kernel(Spy())
    with torch.no_grad():
        limit = ex.KERNEL_MAX_ROWS_PER_EXPERT * 8   # the kernel's rows: so many per local expert
        for rows in (1, limit, limit + 1, 3 * limit):
            ex(torch.randn(rows, 64), torch.randint(0, 8, (rows,)))
        ex(torch.randn(0, 64), torch.zeros(0, dtype=torch.long))
    assert calls == [1, limit]
    x = torch.randn(4, 64, requires_grad=True)  # autograd always takes the torch path
    ex(x, torch.tensor([0, 1, 2, 3])).sum().backward()
    assert calls == [1, limit] and x.grad is not None


def test_build_caches_by_source_and_reports_compiler_errors(tmp_path):
    first = native_build.build("grouped_experts", out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native_build.build("grouped_experts", out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="failed on grouped_experts.c"):
        native_build.build("grouped_experts", cc="/bin/false", out_dir=tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.so")) and not list((tmp_path / "other").glob("tmp*"))


def test_missing_compiler_falls_back_to_torch(monkeypatch, tmp_path, tiny_ckpt, caplog):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang to be found
    monkeypatch.setattr(native_build, "_loaded", {})
    assert native_build.find_compiler() is None
    monkeypatch.setenv("MAVERICK_RAY_CACHE", str(tmp_path / "empty-cache"))  # nothing prebuilt
    with caplog.at_level(logging.WARNING):
        worker = RankWorker(tiny_ckpt, 0, ExpertPlacement.contiguous(16, 1), EngineConfig(max_model_len=64))
    assert not worker.native_experts and worker.info()["native_experts"] is False
    assert not worker.native_rms_norm and worker.info()["native_rms_norm"] is False
    assert "no C compiler found" in caplog.text and "using the torch path" in caplog.text


def test_worker_greedy_tokens_same_with_and_without_kernel(tiny_ckpt):
    from maverick_ray.engine.step_types import RankPlan
    from maverick_ray.engine.sampling import SamplingParams

    from engine_helpers import paged_work, worker_tables

    outs = {}
    for mode in ("auto", "off"):
        w = RankWorker(tiny_ckpt, 0, ExpertPlacement.contiguous(16, 1), EngineConfig(max_model_len=64, cpu_kernels=mode))
        assert w.native_experts == w.native_rms_norm == w.native_attention_prologue == (mode == "auto")
        assert w.native_decode_layers == (4 if mode == "auto" else 0) == w.info()["native_decode_layers"]
        assert w.info()["native_decode_stack"] == (mode == "auto")   # every layer bound: one call per step
        assert w.info()["native_rms_norm"] == (mode == "auto")
        prompts = {f"s{i}": list(range(5 + i, 12 + 2 * i)) for i in range(6)}
        params = SamplingParams(max_tokens=8, temperature=0)
        tables = worker_tables(w)
        work = [paged_work(tables, sid, 0, toks, params) for sid, toks in prompts.items()]
        got = {sid: [] for sid in prompts}
        for _ in range(8):
            res = w.step(RankPlan(work=work))
            work = []
            for i, sid in enumerate(prompts):
                got[sid].append(res.tokens[sid])
                work.append(paged_work(tables, sid, len(prompts[sid]) + len(got[sid]) - 1, [res.tokens[sid]]))
        outs[mode] = got
    assert outs["auto"] == outs["off"]



def test_cpu_kernels_setting_is_validated_and_reaches_the_engine_config():
    from maverick_ray.cli import build_parser
    from maverick_ray.config import ConfigError
    from maverick_ray.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="cpu_kernels"):
        EngineConfig(cpu_kernels="fast")
    assert ServeSettings.from_args({"cpu_kernels": "off"}).engine().cpu_kernels == "off"
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--cpu-kernels", "off"])
    assert args.cpu_kernels == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "hi", "--cpu-kernels", "fast"])
