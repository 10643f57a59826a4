"""Decode attention over the paged KV cache: the native kernel against an earlier revision of it.

Builds native/paged_attention.c from this tree and from a git revision (default: the per-sequence
scores-buffer kernel before the page-by-page online softmax), and times one decode step's
attention per layer on the `mini` attention (8 query heads, 2 kv heads of 64) for several batch x
context shapes, pages scattered over the pool; alternating rounds, medians. Both outputs are
checked equal to 1e-5.

Usage: .venv/bin/python benchmarks/bench_paged_attention.py [--baseline-rev 4559fc7 --threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, median_time, mini_text_config, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((1, 16000), (16, 1024), (32, 128))   # (sequences, cached tokens each)


def baseline_kernel(rev: str, out_dir: Path):
    """The revision's paged_decode_f32 as (q, k_pool, v_pool, table, first, end, block, chunk) -> out."""
    from maverick_ray.native.build import CFLAGS, find_compiler

    src = out_dir / "baseline.c"
    src.write_text(subprocess.run(["git", "show", f"{rev}:maverick_ray/native/paged_attention.c"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout)
    subprocess.run([find_compiler(), *CFLAGS, str(src), "-o", str(out_dir / "baseline.so"), "-lm"], check=True)
    fn = ctypes.CDLL(str(out_dir / "baseline.so")).paged_decode_f32
    P, L = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [P] * 6 + [L] * 7 + [ctypes.c_float, P, ctypes.c_int]

    def call(q, k_pool, v_pool, table, first, end, block, chunk):
        B, KV, G, D = q.shape
        out = torch.empty_like(q)
        fn(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.data_ptr(), first.data_ptr(), end.data_ptr(),
           B, table.shape[1], KV, G, D, block, chunk or 0, 1 / math.sqrt(D), out.data_ptr(), torch.get_num_threads())
        return out
    return call


def scattered(B: int, ctx: int, g):
    from maverick_ray.model.kv_cache import KVLayout, KVView, PagedKVCache

    layout = KVLayout.from_config(mini_text_config())
    pages = B * (ctx // layout.block_size + 2) * layout.num_groups
    cache = PagedKVCache(layout, pages)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    perm, used = torch.randperm(pages, generator=g).tolist(), 0
    first, tables = [[] for _ in layout.groups], [[] for _ in layout.groups]
    for _ in range(B):
        for grp in range(layout.num_groups):
            blocks = layout.blocks_for(grp, ctx, ctx + 1)
            first[grp].append(blocks.start)
            tables[grp].append(perm[used:used + len(blocks)])
            used += len(blocks)
    return cache, KVView(layout, [ctx] * B, [1] * B, first, tables)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="4559fc7", help="git revision of the kernel to compare against")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    from maverick_ray.native.paged_attention import paged_attention_kernel

    torch.set_num_threads(args.threads)
    new = paged_attention_kernel()
    if new is None:
        print("no C compiler: nothing to compare")
        return 0
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_kernel(args.baseline_rev, Path(tmp))
        for B, ctx in SHAPES:
            cache, kv = scattered(B, ctx, g)
            q = torch.randn(B, 2, 4, 64, generator=g)   # (B, KV, G, D)
            for layer, kind, chunk in ((3, "global", None), (0, "chunked (8192)", 8192)):
                grp = cache.group_of(layer)
                call = {name: (lambda k=k: k(q, *cache.pools(layer), kv.table[grp], kv.first[grp], kv.end,
                                             kv.block_size, chunk)) for name, k in (("old", old), ("new", new))}
                assert (call["old"]() - call["new"]()).abs().max() < 1e-5
                times = {"old": [], "new": []}
                for r in range(args.rounds):
                    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        times[name].append(median_time(call[name], 10, warmup=1))
                o, n = statistics.median(times["old"]), statistics.median(times["new"])
                rows.append((B, ctx, kind, o, n))
                print(f"{B} x {ctx}, {kind}: {args.baseline_rev} {o * 1e3:.2f} ms, now {n * 1e3:.2f} ms, "
                      f"{o / n:.2f}x", flush=True)
    command = " ".join([".venv/bin/python benchmarks/bench_paged_attention.py"]
                       + (argv if argv is not None else sys.argv[1:]))
    text = (f"One decode step's attention for one layer, `mini` attention (8 query heads, 2 kv heads of 64), pages "
            f"scattered over the pool, {args.threads} torch thread(s), medians over {args.rounds} alternating rounds "
            f"of 10 calls. Machine: {machine_line()}.\n\n"
            f"| sequences x cached tokens | layer | kernel at {args.baseline_rev} | kernel now | speed-up |\n"
            "|---|---|---|---|---|\n"
            + "".join(f"| {B} x {ctx} | {kind} | {o * 1e3:.2f} ms | {n * 1e3:.2f} ms | {o / n:.2f}x |\n"
                      for B, ctx, kind, o, n in rows)
            + f"\nCommand: `{command}`\n")
    print(text)
    if not args.no_write:
        write_section("bench_paged_attention", "## Native paged decode attention, before and after (issue 17)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
