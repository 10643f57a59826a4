"""What the paged KV cache changes for requests: prefix caching's TTFT, chunked prefill's token gaps.

TTFT: one conversation with a long system prompt (default 2048 tokens) runs first; then 32
requests with the same system prompt and a short question each are submitted at once to the EP = 1
engine on `mini`, prefix caching on and off in alternating rounds (a fresh engine each, in a
subprocess); TTFT per request from submission to its first token, median and p90 per round,
medians over rounds.

Token gaps: 16 greedy streams decode; once each has a few tokens a long prompt (default 16384
tokens) arrives. The gaps between consecutive tokens of the 16 streams while it prefills (its
submission to its first token), p50 and p99, against the same streams' gaps with no long
prompt: before it arrives, and in a control round at the same token indexes (the same contexts),
for several per-step prefill budgets (max_prefill_tokens) and paced settings; the largest budget
runs the whole prompt in one step, as the engine did before chunked prefill.

Usage: .venv/bin/python benchmarks/bench_kv_serving.py [--rounds 3 --system 2048 --long 16384 --budgets 64 256 32768]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess, machine_line, write_section  # noqa: E402


def make_mini(tmp: str) -> str:
    from maverick_ray.checkpoint.writer import write_checkpoint

    return str(write_checkpoint(Path(tmp) / "mini", "mini", progress=False))


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 600) for _ in range(n)]


def ttft_round(ckpt: str, caching: str, system_len: int, requests: int) -> dict:
    """One engine: `requests` requests sharing a system prompt, submitted at once."""
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    system = _tokens(system_len, 0)
    prompts = [system + _tokens(24, 100 + i) for i in range(requests)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    cfg = EngineConfig(max_num_seqs=requests, prefix_caching=caching, max_model_len=system_len + 64)
    with Engine(ckpt, ParallelConfig(ep_size=1), cfg) as eng:
        # One earlier conversation with the same system prompt (steady state: it has been seen
        # before; requests admitted in the same step cannot share blocks none of them has written yet).
        eng.generate(system + _tokens(24, 99), SamplingParams(max_tokens=2, temperature=0))
        t0 = time.monotonic()
        streams = [eng.add_request(p, params) for p in prompts]
        firsts = [None] * requests

        def read(i):
            for ev in streams[i]:
                if ev.token_id is not None and firsts[i] is None:
                    firsts[i] = time.monotonic() - t0

        threads = [threading.Thread(target=read, args=(i,)) for i in range(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hit = eng.stats()["prefix_cache_hit_tokens"]
    firsts.sort()
    return {"median": statistics.median(firsts), "p90": firsts[int(0.9 * (len(firsts) - 1))], "hit_tokens": hit}


def gaps_round(ckpt: str, budget: int, long_len: int, streams_n: int, slowdown: float = 0.0, min_chunk: int = 16,
               control: list[tuple[int, int]] | None = None) -> dict:
    """16 decoding streams; a long prompt arrives; token gaps of the streams before and during its
    prefill. slowdown: the engine's max_decode_slowdown (0: a fixed budget of `budget` tokens a step);
    min_chunk: its min_prefill_chunk.

    The streams' contexts grow while the prompt prefills, and so does their decode step; a
    comparison with the gaps before it would charge that growth to the prompt. So each run also
    returns, per stream, the token indexes of its gaps during the prefill (`windows`), and a
    control round (`control`: those windows) runs the same streams with no long prompt and
    measures the gaps at the same token indexes, that is at the same contexts."""
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    cfg = EngineConfig(max_num_seqs=streams_n + 1, max_prefill_tokens=budget, max_model_len=long_len + 64,
                       kv_cache_memory_gb=1.0, max_decode_slowdown=slowdown, min_prefill_chunk=min_chunk)
    with Engine(ckpt, ParallelConfig(ep_size=1), cfg) as eng:
        eng.generate(_tokens(8, 7), SamplingParams(max_tokens=2, temperature=0))  # warm-up
        params = SamplingParams(max_tokens=long_len, temperature=0, ignore_eos=True)  # aborted at the end
        streams = [eng.add_request(_tokens(16, 200 + i), params) for i in range(streams_n)]
        times: list[list[float]] = [[] for _ in streams]
        stop = threading.Event()

        def read(i):
            for ev in streams[i]:
                if ev.token_id is not None:
                    times[i].append(time.monotonic())
                if stop.is_set():
                    eng.abort(ev.request_id)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(streams_n)]
        for t in threads:
            t.start()
        while min(len(t) for t in times) < 30:  # a calm stretch first: the baseline gaps
            time.sleep(0.05)
        t_in = time.monotonic()
        if control is None:
            long_stream = eng.add_request(_tokens(long_len, 5), SamplingParams(max_tokens=1, temperature=0))
            t_first = next(ev for ev in long_stream if ev.token_id is not None) and time.monotonic()
            time.sleep(0.2)
        else:
            last = max(hi for _, hi in control)
            while min(len(t) for t in times) <= last + 1:
                time.sleep(0.05)
            t_first = time.monotonic()
        stop.set()
        for t in threads:
            t.join(120)

    def gaps(lo, hi):
        return sorted(b - a for ts in times for a, b in zip(ts, ts[1:]) if lo <= a and b <= hi) or [float("nan")]

    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    before = gaps(0, t_in)
    out = {"before_p50": q(before, 0.5), "before_p99": q(before, 0.99), "prefill_s": t_first - t_in}
    if control is None:
        # gap j of a stream: tokens j - 1 -> j; during: the gaps that overlap the prefill
        windows = [(next(j for j in range(1, len(ts)) if ts[j] > t_in),
                    max(j for j in range(1, len(ts)) if ts[j - 1] < t_first)) for ts in times]
    else:
        windows = control
    during = sorted(ts[j] - ts[j - 1] for ts, (lo, hi) in zip(times, windows) for j in range(lo, hi + 1))
    during = during or [float("nan")]
    out.update(during_p50=q(during, 0.5), during_p99=q(during, 0.99), windows=windows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each TTFT setting (default: 3)")
    ap.add_argument("--system", type=int, default=2048, help="shared system prompt tokens (default: 2048)")
    ap.add_argument("--requests", type=int, default=32, help="requests sharing it (default: 32)")
    ap.add_argument("--long", type=int, default=16384, help="the long prompt's tokens (default: 16384)")
    ap.add_argument("--streams", type=int, default=16, help="decoding streams (default: 16)")
    ap.add_argument("--budgets", type=int, nargs="*", default=[64, 256, 32768],
                    help="fixed max_prefill_tokens values (no pacing) for the token-gap runs; one >= --long is "
                         "the behaviour before chunked prefill")
    ap.add_argument("--slowdowns", type=float, nargs="*", default=[2.0],
                    help="max_decode_slowdown values for paced token-gap runs (max_prefill_tokens 4096)")
    ap.add_argument("--min-chunks", type=int, nargs="+", default=[1, 16],
                    help="min_prefill_chunk values for the paced runs (default: 1 16)")
    ap.add_argument("--skip-ttft", action="store_true", help="only the token-gap runs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_kv_serving.py"] + (argv if argv is not None else sys.argv[1:]))
    tmp = tempfile.mkdtemp(prefix="bench-kv-")
    try:
        print("checkpoint mini ...", flush=True)
        ckpt = in_subprocess("bench_kv_serving", "make_mini", tmp)
        ttft = {"on": [], "off": []}
        for rnd in range(0 if args.skip_ttft else args.rounds):
            for caching in (("on", "off") if rnd % 2 == 0 else ("off", "on")):
                r = in_subprocess("bench_kv_serving", "ttft_round", ckpt, caching, args.system, args.requests)
                ttft[caching].append(r)
                print(f"TTFT round {rnd + 1}, prefix caching {caching}: median {r['median']:.2f} s, "
                      f"p90 {r['p90']:.2f} s", flush=True)
        gaps = {}
        runs = [(f"{b}", b, 0.0, 16) for b in args.budgets] + \
               [(f"4096, paced: max_decode_slowdown {s:g}, min_prefill_chunk {m}", 4096, s, m)
                for s in args.slowdowns for m in args.min_chunks]
        for label, budget, slowdown, min_chunk in runs:
            if budget >= args.long and not slowdown:
                label += " (whole prompt in one step: before chunked prefill)"
            g = gaps[label] = in_subprocess("bench_kv_serving", "gaps_round", ckpt, budget, args.long, args.streams,
                                            slowdown, min_chunk)
            c = in_subprocess("bench_kv_serving", "gaps_round", ckpt, budget, args.long, args.streams, slowdown,
                              min_chunk, g["windows"])
            g["control_p50"], g["control_p99"] = c["during_p50"], c["during_p99"]
            print(f"{label}: gaps before p99 {g['before_p99'] * 1e3:.0f} ms, during p99 "
                  f"{g['during_p99'] * 1e3:.0f} ms, same tokens without the prompt p99 {g['control_p99'] * 1e3:.0f} ms, "
                  f"prefill {g['prefill_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    on, off = ttft["on"], ttft["off"]
    lines = [] if args.skip_ttft else [f"TTFT, {args.requests} requests sharing a {args.system}-token system prompt (+24 tokens each) that one "
             f"earlier request used, submitted at once, `mini` EP=1, {args.rounds} alternating rounds:", "",
             "| prefix caching | TTFT median | TTFT p90 | prompt tokens found cached |", "|---|---|---|---|",
             f"| off | {med(off, 'median'):.2f} s | {med(off, 'p90'):.2f} s | {med(off, 'hit_tokens'):.0f} |",
             f"| on | {med(on, 'median'):.2f} s | {med(on, 'p90'):.2f} s | {med(on, 'hit_tokens'):.0f} |", "",
             f"Median TTFT off / on: **{med(off, 'median') / med(on, 'median'):.1f}x** (goal >= 5x).", ""]
    lines += [f"Token gaps of {args.streams} decoding streams while a {args.long}-token prompt prefills (`mini` EP=1):",
             "", "| max_prefill_tokens | gap p50 before | gap p99 before | gap p50 during | gap p99 during | "
             "p99 during / p99 before | same tokens, no prompt: p50 / p99 | p99 during / p99 same tokens | "
             "the prompt's prefill |", "|---|---|---|---|---|---|---|---|---|"]
    for label, g in gaps.items():
        lines.append(f"| {label} | {g['before_p50'] * 1e3:.0f} ms | {g['before_p99'] * 1e3:.0f} ms | "
                     f"{g['during_p50'] * 1e3:.0f} ms | {g['during_p99'] * 1e3:.0f} ms | "
                     f"{g['during_p99'] / g['before_p99']:.1f}x | {g['control_p50'] * 1e3:.0f} / "
                     f"{g['control_p99'] * 1e3:.0f} ms | {g['during_p99'] / g['control_p99']:.1f}x | "
                     f"{g['prefill_s']:.1f} s |")
    lines += ["", "\"Same tokens, no prompt\": a control round of the same streams with no long prompt, its gaps at "
              "the token indexes each stream was at during the prefill (the same contexts): the decode step grows with "
              "the streams' contexts whether or not a prompt arrives."]
    text = "\n".join(lines)
    print(text)
    if not (args.no_write or args.skip_ttft):  # the section holds both tables
        write_section("bench_kv_serving", f"## Prefix caching and chunked prefill (issue 17)\n\nMachine: "
                      f"{machine_line()}.\n\n{text}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
