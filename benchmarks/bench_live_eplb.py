"""Live expert rebalancing under load: what a rebalance costs the streams it happens under.

Each round starts a local Ray cluster and an EP engine with redundant slots and `eplb on` in a
subprocess, runs N concurrent greedy streams once without a rebalance (the reference), then
again with a rebalance asked for once the first stream has a quarter of its tokens, planned from
a routing window skewed onto the experts of rank 0 (so the policy moves experts). Per round: the
rebalance's staging time (all ranks, in the background of steps), the swap pause (the one call
between two steps), the extra bytes staged on the busiest rank, slots moved, the longest token
gap of any stream during the rebalance against the reference run's median gap, and whether the
outputs equal the reference. Medians over rounds.

Usage: .venv/bin/python benchmarks/bench_live_eplb.py [--checkpoint mini --ep 2 --redundant 2 --rounds 3
       --requests 32 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess, machine_line, write_section  # noqa: E402


def make_checkpoint(name: str, tmp: str) -> str:
    from maverick_ray.checkpoint.writer import write_checkpoint

    return str(write_checkpoint(Path(tmp) / name, name, progress=False))


def streams(eng, n: int, new_tokens: int, at_quarter=None):
    """n concurrent greedy streams -> (outputs, per-stream token times); at_quarter() is called
    once the first stream has new_tokens // 4 tokens."""
    from maverick_ray.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    reqs = [eng.add_request([(7 * i + j) % 500 + 3 for j in range(16 + i % 9)], params) for i in range(n)]
    outs, times = [[] for _ in reqs], [[] for _ in reqs]
    fired = threading.Event()

    def read(i):
        for ev in reqs[i]:
            if ev.finished and ev.finish_reason == "error":
                raise RuntimeError(ev.error)
            if ev.token_id is not None:
                outs[i].append(ev.token_id)
                times[i].append(time.monotonic())
                if at_quarter and i == 0 and len(outs[0]) == new_tokens // 4 and not fired.is_set():
                    fired.set()
                    at_quarter()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return outs, times


def one_round(ckpt: str, ep: int, redundant: int, requests: int, new_tokens: int) -> dict:
    import ray

    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.ray_runtime import init_ray

    init_ray("local", num_cpus=ep + 1)
    eng = None
    try:
        par = ParallelConfig(ep_size=ep, redundant_experts=redundant, eplb="on", eplb_interval_steps=10**9,
                             spare_ranks=0)
        eng = Engine(ckpt, par, EngineConfig(max_num_seqs=requests, max_model_len=new_tokens + 64)).start()
        streams(eng, 2, 4)  # warm-up
        reference, ref_times = streams(eng, requests, new_tokens)
        placement = eng.ranks.placement
        hot = set(placement.experts_of(0))
        layers = len(eng.model_config.text.moe_layers)
        counts = [[10_000 if e in hot else 10 for e in range(placement.num_experts)] for _ in range(layers)]
        received = [[sum(c for e, c in enumerate(counts[0]) if e in placement.experts_of(r))] * layers
                    for r in range(ep)]
        asked: list[float] = []

        def ask():   # from a stream's thread: the loop adds the skewed step to its window itself
            asked.append(time.monotonic())
            eng.eplb.request(window_step=(counts, received))

        outs, times = streams(eng, requests, new_tokens, at_quarter=ask)
        st = eng.stats()["eplb"]
        if st["rebalances"] != 1:
            raise RuntimeError(f"expected one rebalance, stats {st}")
        t_ask = asked[0]
        window_end = t_ask + st["last_seconds"] + 1.0
        during = [b - a for ts in times for a, b in zip(ts, ts[1:]) if t_ask <= b <= window_end]
        return {"staging": st["last_seconds"] - st["last_swap_seconds"], "swap": st["last_swap_seconds"],
                "staged_bytes": st["last_staged_bytes"], "moved": st["moved_slots"],
                "max_gap_during": max(during) if during else 0.0,
                "normal_gap": statistics.median(b - a for ts in ref_times for a, b in zip(ts, ts[1:])),
                "identical": outs == reference}
    finally:
        if eng is not None:
            eng.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="mini", choices=["tiny", "mini"], help="preset (default: mini)")
    ap.add_argument("--ep", type=int, default=2, help="EP ranks (default: 2)")
    ap.add_argument("--redundant", type=int, default=2, help="redundant expert slots (default: 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh cluster (default: 3)")
    ap.add_argument("--requests", type=int, default=32, help="concurrent greedy streams (default: 32)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_live_eplb.py"] + (argv if argv is not None else sys.argv[1:]))
    tmp = tempfile.mkdtemp(prefix="bench-eplb-")
    try:
        print(f"checkpoint {args.checkpoint} ...", flush=True)
        ckpt = in_subprocess("bench_live_eplb", "make_checkpoint", args.checkpoint, tmp)
        rows = []
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds} ...", flush=True)
            r = in_subprocess("bench_live_eplb", "one_round", ckpt, args.ep, args.redundant, args.requests,
                              args.new_tokens)
            rows.append(r)
            print(f"    staging {r['staging']:.2f} s, swap {r['swap'] * 1e3:.1f} ms, longest gap during "
                  f"{r['max_gap_during'] * 1e3:.0f} ms (normal {r['normal_gap'] * 1e3:.0f} ms), "
                  f"identical {r['identical']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    text = ("| run | staging (beside the steps) | swap pause | extra bytes staged (busiest rank) | slots moved | "
            "longest token gap during | normal token gap | outputs identical |\n|---|---|---|---|---|---|---|---|\n"
            f"| {args.checkpoint} EP={args.ep} +{args.redundant} redundant, {args.requests} streams | "
            f"{med('staging'):.2f} s | {med('swap') * 1e3:.1f} ms | {med('staged_bytes') / 2**20:.1f} MiB | "
            f"{med('moved'):.0f} | {med('max_gap_during') * 1e3:.0f} ms | {med('normal_gap') * 1e3:.0f} ms | "
            f"{sum(r['identical'] for r in rows)}/{len(rows)} |")
    print(text)
    if not args.no_write:
        write_section("bench_live_eplb", "## Live expert rebalancing under load (issue 19)\n\n"
                      f"{args.requests} concurrent greedy streams of {args.new_tokens} tokens; a rebalance asked for "
                      "once the first stream has a quarter of its tokens, planned from a window skewed onto rank "
                      "0's experts; medians over " f"{args.rounds} rounds, each on a fresh local Ray cluster. "
                      f"Machine: {machine_line()}.\n\n{text}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
