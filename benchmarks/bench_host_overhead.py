"""Where a decode step's time goes on the host: EP = 1 engine, 1 and 32 sequences (issue 21).

Three runs per sequence count on one in-process engine (no Ray), after a warm-up:
1. timed: per step, the engine loop's interval between two steps, the ranks' step call
   (StepStats.seconds), what is left of the interval (engine host work: scheduling, planning,
   finishing the step, emitting tokens), and the rank's phases (module hooks: attention,
   routed experts, shared expert, dense MLP; decode_layer: layers run whole in one native call
   on fp32 CPU ranks; the rest of the rank's step is embedding, norms, lm_head, sampling and
   bookkeeping);
2. profiled (torch.profiler on the rank's compute thread; slower, so only counts come from it):
   aten ops dispatched per step, their summed self time (on a CPU: the kernels' own compute, so
   the ranks' step call minus it is Python, dispatch and threading overhead) and, on a GPU,
   kernel launches and the GPU's busy time per step. On a GPU, step / GPU busy time says how
   host-bound decoding is (1.0: the GPU never waits);
3. cProfile on the compute thread: Python function calls per step.

Writes a table to BENCHMARKS.md unless --no-write. Usage:
  .venv/bin/python benchmarks/bench_host_overhead.py [--checkpoint mini --tokens 64 --device auto]
  (--checkpoint: a preset name, written to a temporary directory, or a checkpoint directory)
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, write_section  # noqa: E402

PHASES = ("decode_layer", "attention", "experts", "shared_expert", "dense_mlp")  # decode_layer: whole native layers


def run_streams(eng, seqs: int, tokens: int) -> float:
    from maverick_ray.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [[10 + (7 * i + j) % 200 for j in range(16)] for i in range(seqs)]
    t0 = time.perf_counter()
    streams = [eng.add_request(p, params) for p in prompts]
    threads = [threading.Thread(target=lambda s=s: [None for _ in s]) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def measure(eng, seqs: int, tokens: int) -> dict:
    steps: list = []
    ends: list[float] = []

    def on_step(s):
        steps.append(s)
        ends.append(time.perf_counter())

    eng.add_step_listener(on_step)
    run_streams(eng, seqs, tokens)
    decode = [i for i, s in enumerate(steps) if s.admitted == 0 and s.num_seqs == seqs]
    pairs = [i for i in decode if i > 0 and i - 1 in decode]
    intervals = [ends[i] - ends[i - 1] for i in pairs]
    host = [ends[i] - ends[i - 1] - steps[i].seconds for i in pairs]   # the loop's own work around the step call
    ranks_call = [steps[i].seconds for i in decode]
    phases = {p: statistics.median(steps[i].phase_seconds.get(p, 0.0) for i in decode) for p in PHASES}
    eng._listeners.remove(on_step)

    # Profiled run: torch.profiler records the thread it runs on, so it starts and stops on the rank's.
    acts = [torch.profiler.ProfilerActivity.CPU]
    if eng.ranks.worker.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    holder = {}

    def start():
        holder["p"] = torch.profiler.profile(activities=acts)
        holder["p"].__enter__()

    counted: list = []
    eng.add_step_listener(counted.append)
    aten = launches = gpu_us = aten_self_us = None
    try:   # counts only; a profiler that cannot run here leaves them out
        eng.ranks._compute.run(start)
        run_streams(eng, seqs, tokens)
        eng.ranks._compute.run(lambda: holder["p"].__exit__(None, None, None))
        n = max(len(counted), 1)
        events = holder["p"].key_averages()
        aten = sum(e.count for e in events if e.key.startswith("aten::")) / n
        launches = sum(e.count for e in events
                       if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / n
        gpu_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events
                     if str(getattr(e, "device_type", "")).endswith("CUDA")) / n
        aten_self_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / n
    except Exception as e:
        print(f"profiled run failed, counts left out: {type(e).__name__}: {e}", flush=True)
    eng._listeners.remove(counted.append)
    py_calls = python_calls_per_step(eng, seqs, tokens)
    interval = statistics.median(intervals)
    return {"seqs": seqs, "step_ms": 1e3 * interval, "ranks_call_ms": 1e3 * statistics.median(ranks_call),
            "engine_host_ms": 1e3 * statistics.median(host),
            "phases_ms": {p: 1e3 * v for p, v in phases.items()},
            "aten_ops_per_step": aten, "kernel_launches_per_step": launches,
            "gpu_busy_ms_per_step": gpu_us / 1e3 if gpu_us else None,
            "aten_self_ms_per_step": aten_self_us / 1e3 if aten_self_us else None, "python_calls_per_step": py_calls}


def python_calls_per_step(eng, seqs: int, tokens: int) -> float:
    """Python function calls the rank's compute thread makes per step (cProfile on that thread)."""
    import cProfile
    import pstats

    prof, counted = cProfile.Profile(), []
    eng.add_step_listener(counted.append)
    eng.ranks._compute.run(prof.enable)   # cProfile hooks the thread that enables it
    run_streams(eng, seqs, tokens)
    eng.ranks._compute.run(prof.disable)
    eng._listeners.remove(counted.append)
    return pstats.Stats(prof).total_calls / max(len(counted), 1)


HEADER = ("| sequences | step (loop interval) | ranks' step call | engine host work | " + " | ".join(PHASES)
          + " | aten ops / step | aten self time / step (profiled) | Python calls / step | kernel launches / step "
            "| GPU busy / step | step / GPU busy |")


def row(r: dict) -> str:
    n = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    busy = r["gpu_busy_ms_per_step"]
    return (f"| {r['seqs']} | {r['step_ms']:.2f} ms | {r['ranks_call_ms']:.2f} ms | {r['engine_host_ms']:.2f} ms | "
            + " | ".join(f"{r['phases_ms'][p]:.2f} ms" for p in PHASES)
            + f" | {n(r['aten_ops_per_step'])} | "
            + ("n/a" if r.get("aten_self_ms_per_step") is None else f"{r['aten_self_ms_per_step']:.2f} ms")
            + f" | {n(r.get('python_calls_per_step'))} | {n(r['kernel_launches_per_step'])} | "
            + (f"{busy:.2f} ms | {r['step_ms'] / busy:.1f}x |" if busy else "n/a | n/a |"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="mini", help="preset (tiny, mini) or checkpoint directory (default: mini)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (default: 64)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 32], help="sequence counts (default: 1 32)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_host_overhead.py"] + (argv if argv is not None else sys.argv[1:]))
    from maverick_ray.checkpoint.writer import write_checkpoint
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine

    tmp = None
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        tmp = tempfile.mkdtemp(prefix="bench-host-")
        print(f"writing the {args.checkpoint} checkpoint ...", flush=True)
        ckpt = write_checkpoint(Path(tmp) / args.checkpoint, args.checkpoint, progress=False)
    rows = []
    try:
        # max_decode_slowdown 0 (no prefill pacing): the prompts are admitted together, so every
        # later step is a decode-only step of all of them (the steps measured)
        cfg = EngineConfig(max_num_seqs=max(args.seqs), max_model_len=args.tokens + 32, device=args.device,
                           max_decode_slowdown=0)
        with Engine(ckpt, ParallelConfig(ep_size=1), cfg, use_ray=False) as eng:
            run_streams(eng, 2, 8)   # warm-up
            eng.ranks.call("enable_phase_timing")
            device = str(eng.ranks.worker.device)
            for seqs in args.seqs:
                print(f"{seqs} sequence(s) ...", flush=True)
                rows.append(measure(eng, seqs, args.tokens))
                print(HEADER + "\n" + row(rows[-1]), flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [HEADER, "|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|---|"] + [row(r) for r in rows]
    text = "\n".join(lines)
    print(f"device {device}\n{text}")
    if not args.no_write:
        write_section(f"bench_host_overhead_{device.split(':')[0]}",
                      f"## Decode step host overhead, {args.checkpoint} on {device} (issue 21)\n\n"
                      f"EP = 1 in-process engine, greedy decode of {args.tokens} tokens per sequence, medians over "
                      "the decode steps. Phases are the rank's host time in those modules (on a GPU: launch "
                      "time, the kernels run asynchronously); counts from a second, profiled run. "
                      f"Machine: {machine_line()}.\n\n{text}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo, where the package is not installed
    sys.exit(main())
