"""Routed experts at decode sizes: the native kernel (maverick_ray/native) vs the torch path.

Each configuration runs both paths interleaved, call by call, over several layers' worth of
expert weights with the caches flushed before every call (so every call streams its matrices
from DRAM), for
several rounds; times are medians, the speedup is the median of the per-round ratios, and the
achieved weight bandwidth is set against the machine's, measured in the same rounds.
Usage: .venv/bin/python benchmarks/bench_expert_kernel.py [--rounds 3 --no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, memory_bandwidth, write_section  # noqa: E402

# (label, local experts, rows, threads): the mini checkpoint's MoE layer as one EP=1 rank with
# 32 decoding sequences sees it, and as one of two single-threaded EP=2 ranks does.
CONFIGS = [("EP=1 rank, 32 sequences", 128, 32, 2), ("EP=2 rank, 16 sequences", 64, 16, 1)]


def layers_of_experts(n_layers, n_local, hidden, inter):
    from maverick_ray.model.moe import Experts

    out = []
    for _ in range(n_layers):
        ex = Experts(n_local, hidden, inter)
        with torch.no_grad():
            ex.gate_up_proj.normal_(0, hidden ** -0.5)
            ex.down_proj.normal_(0, inter ** -0.5)
        ex.fuse_projections()  # the inference layout the ranks use
        out.append(ex)
    return out


def time_pair(layers, kernel, x, ids, calls, flush):
    """Alternates torch-path and kernel calls over the layers -> (torch seconds, kernel seconds),
    medians. Before every timed call an untimed read of `flush` (far larger than the caches)
    evicts the weights, so each call streams them from DRAM."""
    t_torch, t_kernel = [], []
    for i in range(calls):
        ex = layers[i % len(layers)]
        flush.sum()
        t0 = time.perf_counter()
        ex(x, ids)
        t_torch.append(time.perf_counter() - t0)
        flush.sum()
        t0 = time.perf_counter()
        kernel(x, ids, ex.gate_up_proj, ex.down_proj)
        t_kernel.append(time.perf_counter() - t0)
    return statistics.median(t_torch), statistics.median(t_kernel)


def main(argv=None) -> int:
    from maverick_ray.native.grouped_experts import grouped_experts_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="copies of the layer's experts cycled through")
    ap.add_argument("--calls", type=int, default=40, help="calls of each path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    kernel = grouped_experts_kernel()
    if kernel is None:
        print("the native kernel could not be built here (see the warning above)", file=sys.stderr)
        return 1
    torch.set_grad_enabled(False)
    flush = torch.ones(1 << 27)  # 512 MiB
    rows = []
    for label, n_local, n_rows, threads in CONFIGS:
        torch.set_num_threads(threads)
        print(f"{label}: {n_local} local experts, {n_rows} rows, {threads} thread(s) ...", flush=True)
        layers = layers_of_experts(args.layers, n_local, args.hidden, args.inter)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_rows, args.hidden, generator=g)
        ids = torch.randint(0, n_local, (n_rows,), generator=g)
        assert torch.allclose(layers[0](x, ids), kernel(x, ids, layers[0].gate_up_proj, layers[0].down_proj),
                              atol=1e-4, rtol=1e-4)
        nbytes = int(torch.unique(ids).numel()) * 3 * args.hidden * args.inter * 4
        per_round = []
        for _ in range(args.rounds):
            bw = memory_bandwidth()
            per_round.append((bw, *time_pair(layers, kernel, x, ids, args.calls, flush)))
        bw, t_torch, t_kernel = (statistics.median(r[i] for r in per_round) for i in range(3))
        ratio = statistics.median(r[1] / r[2] for r in per_round)
        rows.append(f"| {label} | {threads} | {nbytes / 2**20:.1f} MiB | {t_torch * 1e3:.2f} ms "
                    f"({nbytes / t_torch / 1e9:.1f} GB/s) | {t_kernel * 1e3:.2f} ms ({nbytes / t_kernel / 1e9:.1f} GB/s) "
                    f"| {ratio:.2f}x | {bw / 1e9:.1f} GB/s |")
        del layers
    torch.set_num_threads(max(c[3] for c in CONFIGS))
    table = ("| batch | threads | expert weights touched | torch path | native kernel | speedup | machine bandwidth |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    if not args.no_write:
        write_section("bench_expert_kernel", "## Routed experts at decode sizes: native kernel vs torch path\n\n"
                      f"One MoE layer's routed experts of the `mini` shapes (hidden {args.hidden}, expert width "
                      f"{args.inter}), fp32; both paths alternate call by call over {args.layers} copies of the "
                      f"layer's weights, {args.calls} calls each per round, {args.rounds} rounds, caches flushed (a 512 MiB "
                      f"read) before every call; times are medians, "
                      f"the speedup is the median of per-round ratios. Machine bandwidth: a 1 GiB sum, in the same "
                      f"rounds. Machine: {machine_line()}.\n\n{table}\n\n"
                      "Command: `.venv/bin/python benchmarks/bench_expert_kernel.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
