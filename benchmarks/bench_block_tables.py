"""The engine's per-step page bookkeeping for decoding sequences at long context (issue 21).

Per decode step the scheduler asks BlockTables for each running sequence's pages (pages_needed,
then allocate). This times one step of that for 16 sequences on the `mini` layout (1 global and 3
chunked groups, blocks of 16) at several context lengths, and, in the same run, the same calls
walking every block of the context (how allocate worked before it kept each sequence's last view).
A third column times everything the scheduler does per decoding sequence and step, prefix caching
on: pages_needed, allocate, then (commit) register and trim. Public calls only, so the script also
times another checkout's package (PYTHONPATH=that checkout) for a before/after.

Usage: .venv/bin/python benchmarks/bench_block_tables.py [--contexts 128 4096 16384 --seqs 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, mini_text_config, write_section  # noqa: E402


def step_times(contexts: list[int], seqs: int, walk: bool, steps: int = 64, commit: bool = False) -> dict[int, float]:
    from maverick_ray.engine.kv_blocks import BlockTables
    from maverick_ray.model.kv_cache import KVLayout

    layout = KVLayout.from_config(mini_text_config())
    out = {}
    for ctx in contexts:
        tables = BlockTables(layout, seqs * layout.num_groups * ((ctx + steps) // layout.block_size + 2),
                             caching=commit)
        names = [f"s{i}" for i in range(seqs)]
        hashes = {s: [hash((s, j)) for j in range((ctx + steps) // layout.block_size + 1)] for s in names}
        for s in names:
            tables.allocate(s, 0, ctx)
            if commit:
                tables.register(s, hashes[s], ctx)
                tables.trim(s, ctx)
        times = []
        for pos in range(ctx, ctx + steps):
            t0 = time.perf_counter()
            for s in names:
                if walk:   # forget the last view: every block walked
                    getattr(tables, "_forget_steps", tables._last.pop)(s)
                tables.pages_needed(s, pos, pos + 1)
                tables.allocate(s, pos, pos + 1)
                if commit:
                    tables.register(s, hashes[s], pos + 1)
                    tables.trim(s, pos + 1)
            times.append(time.perf_counter() - t0)
        out[ctx] = statistics.median(times)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 4096, 16384], help="context lengths")
    ap.add_argument("--seqs", type=int, default=16, help="decoding sequences (default: 16)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_block_tables.py"] + (argv if argv is not None else sys.argv[1:]))
    walk, keep = step_times(args.contexts, args.seqs, True), step_times(args.contexts, args.seqs, False)
    full = step_times(args.contexts, args.seqs, False, commit=True)
    text = (f"{args.seqs} decoding sequences, `mini` layout, medians over 64 decode steps. Machine: {machine_line()}.\n\n"
            "| context | walking every block | extending the last view | ratio | whole step's bookkeeping "
            "(+ register, trim; prefix caching on) |\n|---|---|---|---|---|\n"
            + "".join(f"| {c} | {walk[c] * 1e3:.3f} ms | {keep[c] * 1e3:.3f} ms | {walk[c] / keep[c]:.1f}x | "
                      f"{full[c] * 1e3:.3f} ms |\n" for c in args.contexts)
            + f"\nCommand: `{command}`\n")
    print(text)
    if not args.no_write:
        write_section("bench_block_tables", "## Page bookkeeping per decode step at long context (issue 21)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
