"""Cost of metric collection on decode throughput: the same engine run with and without EngineMetrics.

Runs EP=1 on the `mini` checkpoint inside a local Ray (ray.util.metrics needs it), alternating
runs with and without the metrics listeners, and reports the median throughput of each.
Usage: .venv/bin/python benchmarks/bench_metrics_overhead.py [--seqs 32 --new-tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, write_section  # noqa: E402


def run(ckpt, prompts, new_tokens, with_metrics: bool) -> float:
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams
    from maverick_ray.metrics import EngineMetrics

    eng = Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=len(prompts), max_model_len=256)).start()
    try:
        if with_metrics:
            EngineMetrics(eng, "bench", "on")
        eng.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        streams = [eng.add_request(p, params) for p in prompts]
        n = sum(1 for s in streams for ev in s if ev.token_id is not None)
        return n / (time.perf_counter() - t0)
    finally:
        eng.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import ray

    from maverick_ray.checkpoint.writer import write_checkpoint
    from maverick_ray.ray_runtime import init_ray

    ckpt = write_checkpoint(Path(tempfile.mkdtemp()) / "mini", "mini", progress=True)
    prompts = torch.randint(10, 600, (args.seqs, 32), generator=torch.Generator().manual_seed(0)).tolist()
    init_ray("local", num_cpus=2)
    on, off = [], []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats} ...", flush=True)
        off.append(run(ckpt, prompts, args.new_tokens, False))
        on.append(run(ckpt, prompts, args.new_tokens, True))
    ray.shutdown()
    m_on, m_off = statistics.median(on), statistics.median(off)
    cost = (m_off - m_on) / m_off * 100
    text = (f"| run | output tok/s (median of {args.repeats}) |\n|---|---|\n| metrics off | {m_off:.0f} |\n"
            f"| metrics on (per-expert series) | {m_on:.0f} |\n\nMetric collection cost: {cost:.1f}% of decode "
            f"throughput (goal < 3%). Runs alternate off/on to share the machine's noise.")
    print(text)
    if not args.no_write:
        write_section("bench_metrics", f"## Metrics overhead (issue: metrics)\n\n`mini`, EP=1, {args.seqs} "
                      f"sequences x {args.new_tokens} tokens. Machine: {machine_line()}.\n\n{text}\n\n"
                      f"Command: `.venv/bin/python benchmarks/bench_metrics_overhead.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
