"""Per-token cost of logprobs and of structured output on decode throughput.

Runs EP=1 (in-process, no Ray) on the `mini` checkpoint with N concurrent streams, alternating
modes: plain seeded sampling; logprobs (top 5); structured output (a JSON Schema: an array of
small objects, so random weights keep generating structure); structured output and logprobs
together. Prints each mode's median throughput (generated tokens per second over all streams)
and its cost per token against plain sampling. Nothing is written.
Usage: .venv/bin/python benchmarks/bench_sampling_overhead.py [--model DIR] [--seqs 32 --new-tokens 32 --repeats 3]
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
from common import machine_line  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
    "tag": {"enum": ["alpha", "beta", "gamma"]}}, "required": ["id", "ok", "tag"], "additionalProperties": False}}


def modes():
    from maverick_ray.engine.structured_output import GuideSpec

    guide = GuideSpec.json_schema(SCHEMA)
    return {"plain": {}, "logprobs": {"logprobs": 5}, "structured": {"guide": guide},
            "structured+logprobs": {"guide": guide, "logprobs": 5}}


def run(eng, prompts, new_tokens: int, extra: dict) -> tuple[float, int]:
    from maverick_ray.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    streams = [eng.add_request(p, SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True,
                                                 **extra)) for i, p in enumerate(prompts)]
    n = sum(1 for s in streams for ev in s if ev.token_id is not None)
    return n / (time.perf_counter() - t0), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a mini checkpoint (default: write one to a temporary folder)")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from maverick_ray.checkpoint.writer import write_checkpoint
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    ckpt = Path(args.model) if args.model else write_checkpoint(Path(tempfile.mkdtemp()) / "mini", "mini",
                                                                progress=True)
    prompts = torch.randint(10, 600, (args.seqs, 32), generator=torch.Generator().manual_seed(0)).tolist()
    rates: dict[str, list[float]] = {m: [] for m in modes()}
    tokens: dict[str, int] = {}
    with Engine(ckpt, ParallelConfig(ep_size=1),
                EngineConfig(max_num_seqs=args.seqs, max_model_len=256)) as eng:
        eng.generate(prompts[0], SamplingParams(max_tokens=2, guide=modes()["structured"]["guide"]))  # warm-up
        for i in range(args.repeats):
            for name, extra in modes().items():
                rate, tokens[name] = run(eng, prompts, args.new_tokens, extra)
                rates[name].append(rate)
                print(f"repeat {i + 1}/{args.repeats} {name}: {rate:.1f} tokens/s", flush=True)
    print(machine_line())
    print(f"EP=1 mini, {args.seqs} concurrent streams, {args.new_tokens} new tokens each, median of {args.repeats}")
    base = statistics.median(rates["plain"])
    for name, rs in rates.items():
        rate = statistics.median(rs)
        per_token_us = (1 / rate - 1 / base) * 1e6            # extra time per generated token
        print(f"  {name:20s} {rate:8.1f} tokens/s  {100 * (base / rate - 1):+6.1f}% time per token "
              f"({per_token_us:+.1f} us per token, {per_token_us * args.seqs / 1e3:+.2f} ms per decode step; "
              f"{tokens[name]} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
