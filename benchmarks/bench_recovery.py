"""Rank-failure recovery: the pause a kill -9 of one rank costs, and what detection costs when nothing fails.

Recovery: for each checkpoint and EP size, every round starts a local Ray cluster and an engine in
a subprocess, runs N concurrent greedy requests once fault-free (the reference) and once more
with one rank's process killed (SIGKILL) mid-generation, a different rank each round. Per round:
kill -> every stream's next token, the longest pause any stream saw, the engine's
last_recovery_seconds and its ranks' start_seconds (release: the failed rank killed and the
survivors out of the old group; actor_start, group_init, weight_load, setup), the re-prefill
(the recovery's end -> the first token after it), the sequences replayed (those of the killed
rank), whether the outputs equal the reference, and whether a warm spare process took the killed
rank's place. Each round runs every --spare-ranks setting side by side. Medians over rounds.

Overhead: the detection machinery (the per-step deadline, engine/deadline.py; the idle heartbeat,
HEARTBEAT_S; the per-token reseeded sampling, sampling.token_seed) against the same engine with
it neutralised in-process (a constant deadline, a 1 h heartbeat, no reseeding), passes
A B B A then B A A B on one EP = 1 engine in this process (no Ray cluster on the machine), on
the last checkpoint named; greedy passes (deadline and heartbeat) and seeded-sampling passes (all
three). The ratio is taken within each round; medians over rounds.

Usage: .venv/bin/python benchmarks/bench_recovery.py [--checkpoints tiny mini --ep 2 4 --rounds 5 --requests 16
       --spare-ranks 1 0]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess, machine_line, write_section  # noqa: E402

PHASES = ("release", "actor_start", "group_init", "weight_load", "setup")


def make_checkpoint(name: str, tmp: str) -> str:
    """The tiny checkpoint (cached by ensure_tiny_checkpoint) or mini written under `tmp` (run
    through in_subprocess: this process's main thread stays free of torch compute)."""
    from maverick_ray.checkpoint.writer import ensure_tiny_checkpoint, write_checkpoint

    return str(ensure_tiny_checkpoint() if name == "tiny" else write_checkpoint(Path(tmp) / name, name,
                                                                                  progress=False))


def prompts_for(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, 600) for _ in range(length)] for _ in range(n)]


def run_streams(eng, prompts, params, kill=None):
    """Runs the requests concurrently, one reader thread per stream. `kill` = (rank, after): the
    rank's process gets SIGKILL once stream 0 has `after` tokens. Returns (outputs, per-stream
    token arrival times, kill time or None)."""
    streams = [eng.add_request(p, params) for p in prompts]
    outs = [[] for _ in streams]
    times = [[] for _ in streams]
    killed: list[float] = []
    errors: list[str] = []

    def read(i):
        for ev in streams[i]:
            if ev.finished and ev.finish_reason == "error":
                errors.append(ev.error)
            if ev.token_id is None:
                continue
            outs[i].append(ev.token_id)
            times[i].append(time.monotonic())
            if kill and i == 0 and len(outs[0]) == kill[1]:
                os.kill(eng.ranks.infos[kill[0]]["pid"], signal.SIGKILL)
                killed.append(time.monotonic())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return outs, times, (killed[0] if killed else None)


def recovery_round(ckpt: str, ep: int, rank: int, requests: int, prompt_len: int, new_tokens: int,
                   spare_ranks: int = 1) -> dict:
    """One round on a local Ray cluster that lives only for it (run through in_subprocess)."""
    import ray

    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams
    from maverick_ray.ray_runtime import init_ray

    init_ray("local", num_cpus=ep + 1)
    eng = None
    try:
        eng = Engine(ckpt, ParallelConfig(ep_size=ep, spare_ranks=spare_ranks), EngineConfig(
            max_num_seqs=requests, max_model_len=prompt_len + new_tokens + 8)).start()
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        prompts = prompts_for(requests, prompt_len)
        run_streams(eng, prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        reference, ref_times, _ = run_streams(eng, prompts, params)
        spares = set()
        deadline = time.monotonic() + 120
        while spare_ranks and not spares and time.monotonic() < deadline:  # the kill should find a warm spare
            spares = {s["pid"] for s in eng.ranks.spares.warm_info()}
            time.sleep(0.2)
        restarts: list[tuple[float, float]] = []
        recover = eng.ranks.recover

        def timed_recover(failure, timeout):  # where the recovery began and ended, on our clock
            t0 = time.monotonic()
            replaced = recover(failure, timeout)
            restarts.append((t0, time.monotonic()))
            return replaced

        eng.ranks.recover = timed_recover
        outs, times, t_kill = run_streams(eng, prompts, params, kill=(rank, new_tokens // 4))
        if t_kill is None or not restarts:
            raise RuntimeError("the kill did not land mid-generation (raise --new-tokens)")
        t_up = restarts[-1][1]
        after_kill = [[t for t in ts if t > t_kill] for ts in times]
        pauses = [max(b - a for a, b in zip(ts, ts[1:])) for ts in times if len(ts) > 1]
        return {"rank": rank, "kill_to_next": max(ts[0] - t_kill for ts in after_kill if ts),
                "longest_pause": max(pauses), "detect": restarts[0][0] - t_kill,
                "recovery": eng.last_recovery_seconds, "phases": dict(eng.ranks.start_seconds),
                "reprefill": min(t - t_up for ts in times for t in ts if t > t_up),
                "normal_gap": statistics.median(b - a for ts in ref_times for a, b in zip(ts, ts[1:])),
                "identical": outs == reference, "replayed": eng.replayed_sequences,
                "by_spare": eng.ranks.infos[rank]["pid"] in spares}
    finally:
        if eng is not None:
            eng.shutdown()
        ray.shutdown()


class _ConstantDeadline:
    """A deadline with no per-step arithmetic: every step gets step_timeout_s."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def for_step(self, tokens: int) -> float:
        return self.seconds

    def record(self, seconds: float, tokens: int) -> None:
        pass


@contextlib.contextmanager
def machinery_off(eng):
    """Neutralises the detection machinery of an idle EP = 1 engine in this process: a constant
    deadline, a 1 h idle heartbeat, sampling from one generator that is never reseeded."""
    import torch

    from maverick_ray.engine import engine as engine_mod
    from maverick_ray.engine import rank_sampler as sampler_mod

    class NoReseed(torch.Generator):
        def manual_seed(self, seed):
            return self

    sampler = eng.ranks.worker._sampler  # made by the warm-up's first sampled step
    saved = (eng._deadline, engine_mod.HEARTBEAT_S, sampler_mod.token_seed, sampler._generator)
    eng._deadline = _ConstantDeadline(eng.engine_cfg.step_timeout_s)
    engine_mod.HEARTBEAT_S = 3600.0
    sampler_mod.token_seed = lambda seed, position: 0
    sampler._generator = NoReseed()
    try:
        yield
    finally:
        eng._deadline, engine_mod.HEARTBEAT_S, sampler_mod.token_seed, sampler._generator = saved


def overhead(ckpt: str, rounds: int, requests: int, prompt_len: int, new_tokens: int) -> dict:
    """Output tokens/s with the machinery on (A) and off (B): each round runs A B B A (or B A A B)
    and keeps each side's mean."""
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    eng = Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(
        max_num_seqs=requests, max_model_len=prompt_len + new_tokens + 8), use_ray=False).start()
    prompts = prompts_for(requests, prompt_len)
    kinds = {"greedy": lambda i: SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True),
             "seeded": lambda i: SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=1000 + i,
                                                ignore_eos=True)}

    def tok_s(kind, off):
        with machinery_off(eng) if off else contextlib.nullcontext():
            t0 = time.perf_counter()
            streams = [eng.add_request(p, kinds[kind](i)) for i, p in enumerate(prompts)]
            n = sum(1 for s in streams for ev in s if ev.token_id is not None)
            return n / (time.perf_counter() - t0)

    res = {k: {"on": [], "off": []} for k in kinds}
    try:
        for kind in kinds:  # warm-up, both ways
            tok_s(kind, False), tok_s(kind, True)
        for rnd in range(rounds):  # A B B A, then B A A B: drift and pass order cancel within a round
            print(f"overhead round {rnd + 1}/{rounds} ...", flush=True)
            for kind in kinds:
                got = {False: [], True: []}
                for off in ((False, True, True, False) if rnd % 2 == 0 else (True, False, False, True)):
                    got[off].append(tok_s(kind, off))
                res[kind]["on"].append(statistics.mean(got[False]))
                res[kind]["off"].append(statistics.mean(got[True]))
    finally:
        eng.shutdown()
    return res


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["tiny", "mini"], choices=["tiny", "mini"],
                    help="presets to recover (default: tiny mini); the overhead runs on the last one")
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes to recover (default: 2 4)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="kill rounds per checkpoint and EP size, each on a fresh cluster and engine (default: 5)")
    ap.add_argument("--requests", type=int, default=16, help="concurrent greedy requests (default: 16)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    ap.add_argument("--new-tokens", type=int, default=64,
                    help="tokens per request; the kill comes once the first stream has a quarter (default: 64)")
    ap.add_argument("--spare-ranks", type=int, nargs="+", default=[1, 0],
                    help="spare_ranks settings to compare, side by side in each round (default: 1 0)")
    ap.add_argument("--overhead-rounds", type=int, default=10,
                    help="A B B A rounds of the no-failure overhead (default: 10; 0 skips it)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_recovery.py"] + (argv if argv is not None else sys.argv[1:]))
    tmp = tempfile.mkdtemp(prefix="bench-recovery-")
    try:
        ckpts = {}
        for name in args.checkpoints:
            print(f"checkpoint {name} ...", flush=True)
            ckpts[name] = in_subprocess("bench_recovery", "make_checkpoint", name, tmp)
        rows: dict[str, list[dict]] = {}
        t_start = time.monotonic()
        for name in args.checkpoints:
            for ep in args.ep:
                for rnd in range(args.rounds):
                    rank = rnd % ep
                    for spare in args.spare_ranks:
                        key = f"{name} EP={ep} spare_ranks={spare}"
                        print(f"[{time.monotonic() - t_start:5.0f} s] {key} round {rnd + 1}/{args.rounds}: "
                              f"kill -9 rank {rank} ...", flush=True)
                        r = in_subprocess("bench_recovery", "recovery_round", ckpts[name], ep, rank, args.requests,
                                          args.prompt_len, args.new_tokens, spare)
                        rows.setdefault(key, []).append(r)
                        print(f"    kill -> next token {r['kill_to_next']:.2f} s, recovery {r['recovery']:.2f} s, "
                              f"re-prefill {r['reprefill'] * 1e3:.0f} ms, identical {r['identical']}, "
                              f"replaced by a spare {r['by_spare']}", flush=True)
        ovh = overhead(ckpts[args.checkpoints[-1]], args.overhead_rounds, args.requests, args.prompt_len,
                       args.new_tokens) if args.overhead_rounds > 0 else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    lines = ["| run | kill -> next token | longest pause | detect | last_recovery_seconds | "
             + " | ".join(PHASES) + " | re-prefill | normal token gap | outputs identical |",
             "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|"]
    for key, rs in rows.items():
        phases = " | ".join(f"{med([r['phases'].get(p, 0.0) for r in rs]):.2f} s" for p in PHASES)
        lines.append(f"| {key} | {med([r['kill_to_next'] for r in rs]):.2f} s | "
                     f"{med([r['longest_pause'] for r in rs]):.2f} s | {ms(med([r['detect'] for r in rs]))} | "
                     f"{med([r['recovery'] for r in rs]):.2f} s | {phases} | {ms(med([r['reprefill'] for r in rs]))} | "
                     f"{ms(med([r['normal_gap'] for r in rs]))} | {sum(r['identical'] for r in rs)}/{len(rs)} |")
    per_round = ["| run | round | killed rank | kill -> next token | recovery | re-prefill | replayed | identical | "
                 "by a spare | start phases |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, rs in rows.items():
        per_round += [f"| {key} | {i + 1} | {r['rank']} | {r['kill_to_next']:.2f} s | {r['recovery']:.2f} s | "
                      f"{ms(r['reprefill'])} | {r['replayed']} | {r['identical']} | {r['by_spare']} | "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()) + " |"
                      for i, r in enumerate(rs)]
    text = "\n".join(lines) + "\n\nPer round:\n\n" + "\n".join(per_round)
    if ovh is not None:
        ov = ["| requests | machinery on (tok/s) | neutralised (tok/s) | cost (median of per-round ratios) | "
              "per round |", "|---|---|---|---|---|"]
        for kind, r in ovh.items():
            costs = [1 - a / b for a, b in zip(r["on"], r["off"])]
            ov.append(f"| {kind} | {med(r['on']):.0f} | {med(r['off']):.0f} | {med(costs) * 100:+.1f}% | "
                      + ", ".join(f"{c * 100:+.1f}%" for c in costs) + " |")
        text += (f"\n\nDetection cost with nothing failing, `{args.checkpoints[-1]}` EP=1 (goal < 2%; "
                 f"{args.overhead_rounds} rounds of A B B A / B A A B passes):\n\n" + "\n".join(ov))
    print(text)
    if not args.no_write:
        about = (
            f"{args.requests} concurrent greedy requests, prompt {args.prompt_len} tokens, {args.new_tokens} new "
            f"tokens, default engine settings; kill -9 of one rank's process once the first stream has "
            f"{args.new_tokens // 4} tokens, a different rank each round, {args.rounds} rounds, each on a fresh local "
            "Ray cluster and engine in a subprocess, the spare_ranks settings side by side in each round (with "
            "spares, the kill waits until a spare is warm). kill -> next token: until every stream had a token again; "
            "longest pause: the largest gap between two tokens of any stream; detect: kill -> the recovery began; "
            "start phases: the slowest rank's (setup is the ranks' whole setup call, which holds group_init and "
            "weight_load: actor_start + setup is about last_recovery_seconds); re-prefill: the recovery's end -> "
            "the first token after it; normal token gap: the fault-free reference run's median. Outputs are "
            "compared with the fault-free run of the same round. Medians over rounds. Overhead: one EP=1 engine "
            "in the benchmark process (no Ray cluster), the detection machinery on and neutralised in-process "
            "(constant deadline, 1 h heartbeat, no per-token reseeding); cost = 1 - on/off within each round "
            "(A B B A or B A A B passes, each side's mean).")
        write_section("bench_recovery", f"## Rank-failure recovery (issue 16)\n\n{about} Machine: {machine_line()}."
                      f"\n\n{text}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
