"""Prefill-sized CPU kernels against what they replaced, side by side in one process.

- Dense matmuls of mini's shapes (hidden 512: fused qkv 512 x 768, gate/up 512 x 2048, down
  1024 x 512) at prefill and mixed-step row counts: `fused.matmul` (oneDNN over a packed weight
  from PACKED_MIN_ROWS rows) against torch.mm (MKL's sgemm).
- Routed experts of one mini MoE layer (128 experts, hidden 512, width 256, top-1) at prefill
  chunk sizes: the native grouped kernel (its register tiles from 8 rows a pass) against the
  torch path (one BLAS matmul pair per expert), caches flushed before every call.

Each pair runs interleaved, call by call, for several rounds; times are medians, the ratio is
the median of the per-call ratios. Usage:
  .venv/bin/python benchmarks/bench_prefill_kernels.py [--rounds 15 --no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, write_section  # noqa: E402

MATMULS = [(512, 768), (512, 2048), (1024, 512)]     # (K, N)
MATMUL_ROWS = [16, 64, 256, 512, 2048]
EXPERT_ROWS = [512, 2048, 4096, 8192]


def paired(a, b, rounds: int, before=None) -> tuple[float, float, float]:
    """Runs a and b alternately `rounds` times each -> (median a, median b, median of a / b)."""
    ta, tb = [], []
    for i in range(rounds + 1):
        for fn, out in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
            if before:
                before()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    ta, tb = ta[1:], tb[1:]   # the first round warms up (and packs the weight)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def bench_matmuls(rounds: int) -> list[str]:
    from maverick_ray.model.fused import PACKED_MIN_ROWS, matmul

    g = torch.Generator().manual_seed(0)
    lines = ["| rows | K x N | torch.mm (MKL) | fused.matmul | MKL / ours |", "|---:|---|---:|---:|---:|"]
    for rows in MATMUL_ROWS:
        for K, N in MATMULS:
            x, w = torch.randn(rows, K, generator=g), torch.randn(K, N, generator=g)
            with torch.inference_mode():
                mkl, ours, ratio = paired(lambda: torch.mm(x, w), lambda: matmul(x, w), rounds)
            tag = "" if rows >= PACKED_MIN_ROWS else " (mm: below PACKED_MIN_ROWS)"
            line = f"| {rows} | {K} x {N} | {mkl * 1e3:.3f} ms | {ours * 1e3:.3f} ms{tag} | {ratio:.2f}x |"
            print(line, flush=True)
            lines.append(line)
    return lines


def bench_experts(rounds: int) -> list[str]:
    from maverick_ray.model.moe import Experts
    from maverick_ray.native.grouped_experts import grouped_experts_kernel

    kernel = grouped_experts_kernel()
    if kernel is None:
        return ["(no native kernel: no C compiler)"]
    E, C, I = 128, 512, 256
    ex = Experts(E, C, I)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, C ** -0.5)
        ex.down_proj.normal_(0, I ** -0.5)
    ex.fuse_projections()
    flush = torch.empty(64 << 20)   # 256 MiB written before each call: weights come from DRAM
    g = torch.Generator().manual_seed(1)
    lines = ["| rows (per expert) | torch path (BLAS per expert) | native kernel | torch / kernel |", "|---:|---:|---:|---:|"]
    for rows in EXPERT_ROWS:
        x, ids = torch.randn(rows, C, generator=g), torch.randint(0, E, (rows,), generator=g)

        def torch_path():
            ex.kernel = None
            ex(x, ids)

        with torch.inference_mode():
            blas, ours, ratio = paired(torch_path, lambda: kernel(x, ids, ex.gate_up_proj, ex.down_proj),
                                       rounds, before=lambda: flush.fill_(1.0))
        line = f"| {rows} ({rows // E}) | {blas * 1e3:.2f} ms | {ours * 1e3:.2f} ms | {ratio:.2f}x |"
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="calls of each variant per configuration")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    print("dense matmuls ...", flush=True)
    mm = bench_matmuls(args.rounds)
    print("routed experts ...", flush=True)
    experts = bench_experts(args.rounds)
    body = "\n".join([
        "## Prefill-sized CPU kernels, side by side (issue 21)", "",
        f"Interleaved call by call, {args.rounds} calls each; medians, ratio = median of per-call ratios. "
        f"{machine_line()}", "",
        "Dense matmuls (mini's projection shapes):", "", *mm, "",
        "Routed experts of one mini MoE layer (128 experts, hidden 512, width 256), caches flushed before "
        "each call:", "", *experts, "",
        f"Command: `.venv/bin/python benchmarks/bench_prefill_kernels.py --rounds {args.rounds}`"])
    print(body)
    if not args.no_write:
        write_section("bench_prefill_kernels", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
