"""Side by side with llama.cpp on the `mini` checkpoint (issue 21): decode at 1 and N sequences, prefill, parity.

llama.cpp is built from the pinned llama-cpp-python sdist (benchmarks/llamacpp.py: cmake, -DGGML_NATIVE=ON,
Release; only llama-batched-bench and libllama), cached under the project's cache dir
(~/.cache/maverick-ray/llama.cpp-<version>, or $MAVERICK_RAY_CACHE): the first run builds for about 10
minutes on a quiet 2-core machine, later runs reuse it. Without cmake or a C/C++ compiler the script says so
and exits 0.

Steps: write the mini checkpoint (or --checkpoint), convert it to f32 GGUF with the sdist's converter, start
our engine (EP=1, in this process, no Ray, default settings but no prefill pacing), then
1. greedy parity: 4 prompts, each decoded by llama.cpp at our numerics (f32 KV cache, flash attention off;
   ctypes bindings from the sdist, one sequence at a time) and by our engine, token ids compared;
2. rounds (default 3): in each, our engine, llama.cpp at its defaults (f16 KV cache, flash attention auto)
   and llama.cpp at our numerics, in an order that alternates between rounds, each measuring
   - decode at 1 and at N sequences (prompt --prompt-len random tokens, --new-tokens steps): tokens per
     second over the decode steps only (llama-batched-bench's S_TG; ours: N x steps / their wall time);
   - prefill of one --prefill-len-token prompt, --prefill-repeats times (median): prompt tokens/s
     (llama-batched-bench's S_PP; ours: from add_request to the first token).
   Both run with --threads threads (default: torch's, 2 on a 2-core machine) on the same cores.
Figures are medians over rounds; ratios ours/llama.cpp are taken within each round, then the median.
Writes a section to BENCHMARKS.md unless --no-write.

Usage: .venv/bin/python benchmarks/bench_llamacpp.py [--rounds 3] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))   # the repo, where the package is not installed
import llamacpp  # noqa: E402
from common import in_subprocess, machine_line, write_section  # noqa: E402

PARITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Every token is routed to one of many experts; the router picks the expert with the largest score.",
    "Tell me a story about a dragon, a wizard and a castle on a hill.",
    "Operators watch how evenly tokens spread over experts and ranks.",
]
SYSTEMS = ("ours", "llama.cpp defaults", "llama.cpp f32 KV, FA off")


class Ours:
    """Our engine, EP = 1 in this process (as `maverick-ray generate --ep 1` runs it), kept up for the run."""

    def __init__(self, ckpt: Path, seqs: int, max_len: int):
        from maverick_ray.config import EngineConfig, ParallelConfig
        from maverick_ray.engine.engine import Engine

        # max_decode_slowdown 0: the N prompts are admitted together, as llama-batched-bench's are.
        # With pacing, an engine loop that wakes between two add_request calls starts decoding the
        # first prompts and paces the rest in, and a short run may never hold all N at once.
        # Decode-only steps, the ones timed, run the same either way.
        cfg = EngineConfig(max_num_seqs=seqs, max_model_len=max_len, max_decode_slowdown=0)
        self.engine = Engine(ckpt, ParallelConfig(ep_size=1), cfg, use_ray=False).start()
        self.marks: list = []
        self.engine.add_step_listener(lambda s: self.marks.append((s, time.perf_counter())))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
        from maverick_ray.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        streams = [self.engine.add_request(p, params) for p in prompts]
        outs = [[ev.token_id for ev in s if ev.token_id is not None] for s in streams]
        return outs, time.perf_counter() - t0

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(tokens/s, seconds/step) over the steps that only decode all len(prompts) sequences."""
        first = len(self.marks)
        self.generate(prompts, new_tokens)
        marks = self.marks[first:]
        n = len(prompts)
        dts = [t - t_prev for (s_prev, t_prev), (s, t) in zip(marks, marks[1:])
               if s.num_seqs == n and s.admitted == 0 and s_prev.num_seqs == n]
        if not dts:
            raise RuntimeError(f"no step decoded all {n} sequences: raise --new-tokens")
        return n * len(dts) / sum(dts), sum(dts) / len(dts)

    def prefill(self, prompt: list[int]) -> float:
        return len(prompt) / self.generate([prompt], 1)[1]

    def close(self):
        self.engine.shutdown()


def random_prompts(rng: random.Random, n: int, length: int) -> list[list[int]]:
    return [[rng.randrange(10, 600) for _ in range(length)] for _ in range(n)]


def run_round(rnd: int, args, ours: Ours, lc, gguf: Path) -> dict:
    """One round: every system once, in an order that alternates between rounds. {system: figures}."""
    rng = random.Random(rnd)   # fresh prompts per round: no prefix-cache hits for our engine
    order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
    got = {}
    for name in order:
        if name == "ours":
            r = {}
            for n in (1, args.seqs):
                r[f"decode{n}"], r[f"step{n}"] = ours.decode(random_prompts(rng, n, args.prompt_len), args.new_tokens)
            r["prefill"] = statistics.median(ours.prefill(random_prompts(rng, 1, args.prefill_len)[0])
                                             for _ in range(args.prefill_repeats))
        else:
            eq = name != "llama.cpp defaults"
            rows = llamacpp.batched_bench(lc, gguf, args.threads, [args.prompt_len], args.new_tokens,
                                          [1, args.seqs], eq)
            r = {}
            for n in (1, args.seqs):
                r[f"decode{n}"], r[f"step{n}"] = llamacpp.decode_rate(rows, n)
            rows = llamacpp.batched_bench(lc, gguf, args.threads, [args.prefill_len] * args.prefill_repeats, 1,
                                          [1], eq)
            r["prefill"] = llamacpp.prefill_rate(rows, args.prefill_len)
        got[name] = r
    return got


def parity(args, ours: Ours, lc, gguf: Path, ckpt: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    bos = tok.token_to_id("<|begin_of_text|>")
    ids = [tok.encode(t, add_special_tokens=False).ids for t in PARITY_TEXTS[:args.parity_prompts]]
    prompts = [[bos] + i for i in ids]
    theirs = in_subprocess("llamacpp", "greedy_in_process", str(lc.src), str(lc.bin), str(gguf), prompts,
                           args.parity_tokens, args.threads, PARITY_TEXTS[:args.parity_prompts])
    mine = [ours.generate([p], args.parity_tokens)[0][0] for p in prompts]   # one at a time, as llama.cpp ran
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(mine, theirs["outs"])]
    return {"same": sum(d is None for d in first_diff), "n": len(prompts), "first_diff": first_diff,
            "tokenizer_same": theirs["tokenized"] == ids}


def report(args, rounds: list[dict], par: dict, load: float | None, load_before: float, elapsed: float) -> str:
    med = lambda name, key: statistics.median(rd[name][key] for rd in rounds)  # noqa: E731
    lines = ["| figure | llama.cpp defaults | llama.cpp f32 KV, flash attention off | maverick-ray | "
             "ours / defaults | ours / f32 KV, FA off |", "|---|---|---|---|---|---|"]
    for key, title in ((f"decode{args.seqs}", f"{args.seqs} sequences, decode only"),
                       ("decode1", "1 sequence, decode only"),
                       ("prefill", f"prefill of one {args.prefill_len}-token prompt")):
        cells, ratios = [], []
        for name in SYSTEMS[1:] + SYSTEMS[:1]:
            step = f" ({med(name, 'step' + key[6:]) * 1e3:.2f} ms/step)" if key.startswith("decode") else ""
            cells.append(f"{med(name, key):.0f} tok/s{step}")
        for name in SYSTEMS[1:]:   # ours / theirs within each round, then the median (and range)
            r = [rd["ours"][key] / rd[name][key] for rd in rounds]
            ratios.append(f"{statistics.median(r):.2f}x" + (f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else ""))
        lines.append(f"| {title} | " + " | ".join(cells + ratios) + " |")
    diverged = ", ".join(f"token {d}" for d in par["first_diff"] if d is not None)
    notes = [
        f"- greedy parity at equal numerics (llama.cpp f32 KV cache, flash attention off, against our engine EP=1): "
        f"{par['same']}/{par['n']} prompts x {args.parity_tokens} tokens identical"
        + (f"; first divergence at {diverged}" if diverged else "")
        + f"; llama.cpp's tokenizer splits the prompt texts as ours: {par['tokenizer_same']}",
        f"- machine: {machine_line()}; {args.threads} thread(s) for llama.cpp and for our engine; llama-cpp-python "
        f"{llamacpp.LLAMA_CPP_PYTHON} sdist, built with -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release",
        f"- load: 1-minute load average {load_before:.2f} before the run; other processes used "
        + (f"{load:.2f} cores on average" if load is not None else "an unknown share of the cores")
        + f" during the {elapsed:.0f} s of timed rounds"
        + (" (measured under load: the figures are lower and noisier than on a quiet machine)"
           if load is not None and load > 0.25 else ""),
    ]
    return "\n".join(lines) + "\n\nRatio columns: median over rounds of ours / llama.cpp within each round " \
        "(range over rounds in brackets).\n\n" + "\n".join(notes)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds, medians over them (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 round, 32 new tokens, 1 prefill per round (~1 min "
                                                         "after the build on a quiet 2-core machine)")
    ap.add_argument("--seqs", type=int, default=32, help="the batched decode's sequence count (default 32)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the decode runs (default 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps per run (default 64; --quick 32)")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill run (default 512)")
    ap.add_argument("--prefill-repeats", type=int, default=None, help="prefills per round, median (default 3)")
    ap.add_argument("--parity-prompts", type=int, default=4, choices=range(1, len(PARITY_TEXTS) + 1),
                    metavar="1-4", help="prompts of the greedy parity check (default 4)")
    ap.add_argument("--parity-tokens", type=int, default=64, help="greedy tokens per parity prompt (default 64)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help=f"threads of llama.cpp and of our engine (torch.set_num_threads; default: torch's, "
                         f"here {torch.get_num_threads()})")
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: write the mini preset to "
                                                        "a temporary directory)")
    ap.add_argument("--sdist", default=None, help="a local llama-cpp-python sdist (.tar.gz) of the pinned version, "
                                                  "instead of downloading it with pip")
    ap.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: the cores)")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama.cpp, print where, and stop")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    args.prefill_repeats = args.prefill_repeats or (1 if args.quick else 3)
    command = " ".join([".venv/bin/python benchmarks/bench_llamacpp.py"] + (argv if argv is not None else sys.argv[1:]))
    load_before = os.getloadavg()[0]

    torch.set_num_threads(args.threads)   # our engine's compute thread takes it up (no torch compute here)
    missing = llamacpp.missing_toolchain()
    if missing:
        print(f"bench_llamacpp: skipped, llama.cpp cannot be built here: {missing}", flush=True)
        return 0
    lc = llamacpp.ensure_build(sdist=args.sdist, jobs=args.jobs)
    print(f"llama.cpp {llamacpp.LLAMA_CPP_PYTHON}: {lc.bin}", flush=True)
    if args.build_only:
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    ours = None
    try:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            print("writing the mini checkpoint ...", flush=True)
            ckpt = Path(in_subprocess("bench_engine", "write_mini", str(tmp / "mini")))
        print("converting it to f32 GGUF ...", flush=True)
        gguf = Path(in_subprocess("llamacpp", "convert_in_process", str(lc.vendor), str(ckpt),
                                  str(tmp / "mini-f32.gguf")))
        print("starting our engine (EP=1) ...", flush=True)
        max_len = max(args.prefill_len + 8, args.prompt_len + args.new_tokens, 32 + args.parity_tokens) + 16
        ours = Ours(ckpt, args.seqs, max_len)
        ours.decode(random_prompts(random.Random(-1), args.seqs, args.prompt_len), 4)   # warm-up
        ours.prefill(random_prompts(random.Random(-2), 1, args.prefill_len)[0])
        print(f"greedy parity, {args.parity_prompts} prompts x {args.parity_tokens} tokens ...", flush=True)
        par = parity(args, ours, lc, gguf, ckpt)
        print(f"  {par['same']}/{par['n']} identical (first divergences: {par['first_diff']})", flush=True)
        load, t0, rounds = llamacpp.OtherLoad(), time.perf_counter(), []
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(SYSTEMS) + " ...", flush=True)
            rounds.append(run_round(rnd, args, ours, lc, gguf))
            for name, r in rounds[-1].items():
                print(f"  {name}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" if k.startswith("step") else
                                               f"{k} {v:.0f} tok/s" for k, v in r.items()), flush=True)
        elapsed, other = time.perf_counter() - t0, load.cores()
    finally:
        if ours is not None:
            ours.close()
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, rounds, par, other, load_before, elapsed)
    print(text)
    if not args.no_write:
        write_section("bench_llamacpp", (
            f"## Side by side with llama.cpp (issue 21)\n\n`mini` checkpoint (hidden 512, 128 experts, 4 layers), "
            f"f32 weights; llama.cpp on the same checkpoint converted to f32 GGUF. Decode runs: prompts of "
            f"{args.prompt_len} random tokens, {args.new_tokens} decode steps, tokens/s over the decode steps only "
            f"(llama-batched-bench's S_TG; ours: sequences x steps / the steps' wall time); prefill: one "
            f"{args.prefill_len}-token prompt, prompt tokens/s (llama-batched-bench's S_PP; ours: add_request to "
            f"first token), median of {args.prefill_repeats} per round. Our engine: EP=1 in-process, default "
            f"settings. llama.cpp defaults: f16 KV cache, flash attention auto. {args.rounds} rounds, the three "
            f"systems in alternating order; figures are medians over rounds.\n\n{text}\n\nCommand: `{command}`\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
