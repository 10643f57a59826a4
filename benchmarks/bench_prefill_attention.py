"""One layer's attention for a prompt chunk that continues a long cached sequence (issue 17).

The `mini` preset's attention (8 query heads, 2 kv heads of 64) on its global (NoPE) layer and
on a chunked layer (chunk 8192), one sequence with L cached tokens scattered over the pages of a
paged cache, and a chunk of n new tokens after them. Three paths, in alternating rounds in one
process: the masked one (gather every cached key and value, a boolean mask over the context, one
GQA SDPA), model/prefill_attention.py's (past and new keys apart, merged by log-sum-exp) and the
native kernel's (native/paged_attention.c: pages read in place, online softmax; what
`Attention._mixed` uses for chunks of at most KERNEL_MAX_NEW tokens). What a paced prefill chunk
costs per layer, and so how small a chunk can be before its fixed cost dominates the decode step
it joins.

Usage: .venv/bin/python benchmarks/bench_prefill_attention.py [--context 16000 --new 1 4 8 16 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, median_time, mini_text_config, write_section  # noqa: E402


def setup(layer: int, context: int, n: int):
    from maverick_ray.model.attention import Attention
    from maverick_ray.model.batch import ForwardBatch
    from maverick_ray.model.kv_cache import KVLayout, KVView, PagedKVCache

    text = mini_text_config()
    g = torch.Generator().manual_seed(0)
    attn = Attention(text, layer)
    layout = KVLayout.from_config(text)
    bs = layout.block_size
    pages = (context + n) // bs + 2
    cache = PagedKVCache(layout, pages * layout.num_groups)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    perm = torch.randperm(pages * layout.num_groups, generator=g).tolist()   # pages scattered
    first, tables = [], []
    for grp in range(layout.num_groups):
        blocks = layout.blocks_for(grp, context, context + n)
        first.append([blocks.start])
        tables.append([[perm[grp * pages + j] for j in range(len(blocks))]])
    batch = ForwardBatch.build([context], [n], kv=KVView(layout, [context], [n], first, tables))
    attn.group = cache.group_of(layer)
    q = torch.randn(n, text.num_attention_heads, text.head_dim, generator=g)
    k = torch.randn(n, text.num_key_value_heads, text.head_dim, generator=g)
    v = torch.randn(n, text.num_key_value_heads, text.head_dim, generator=g)
    cache.write(layer, batch.kv.write_rows[attn.group], k, v)   # as the forward does before attending
    return attn, batch, cache, q, k, v


def measure(layer: int, context: int, n: int, rounds: int, repeats: int = 5) -> dict:
    from maverick_ray.model import prefill_attention
    from maverick_ray.native.paged_attention import paged_attention_kernel

    attn, batch, cache, q, k, v = setup(layer, context, n)
    cache.attention_kernel = paged_attention_kernel()
    real = prefill_attention.supported
    qlen = torch.tensor([n])
    calls = {"masked": lambda: attn._per_sequence(q, k, v, batch, cache),
             "split": lambda: attn._per_sequence(q, k, v, batch, cache),
             "native": lambda: attn._native(q, batch, cache, qlen)}
    times = {m: [] for m in calls}
    outs = {}
    for r in range(rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for mode in order:
            prefill_attention.supported = (lambda q: False) if mode == "masked" else real
            try:
                outs[mode] = calls[mode]()   # also the warm-up
                times[mode].append(median_time(calls[mode], repeats, warmup=0))
            finally:
                prefill_attention.supported = real
    out = {m: statistics.median(t) for m, t in times.items()}
    out["max_diff"] = max(float((outs["masked"] - outs[m]).abs().max()) for m in ("split", "native"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=16000,
                    help="cached tokens before the chunk (default: 16000: the chunked layer sees the 7808 of its chunk)")
    ap.add_argument("--new", type=int, nargs="+", default=[1, 4, 8, 16, 64], help="new tokens per chunk")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python benchmarks/bench_prefill_attention.py"]
                       + (argv if argv is not None else sys.argv[1:]))
    rows = []
    for layer, kind in ((3, "global (NoPE)"), (0, "chunked (8192)")):
        for n in args.new:
            r = measure(layer, args.context, n, args.rounds)
            rows.append((kind, n, r))
            print(f"{kind}, {n} new: masked {r['masked'] * 1e3:.2f} ms, split {r['split'] * 1e3:.2f} ms, "
                  f"native {r['native'] * 1e3:.2f} ms, max |diff| {r['max_diff']:.1e}", flush=True)
    text = (f"`mini` attention (8 query heads, 2 kv heads of 64), one sequence with {args.context} cached tokens "
            f"on scattered pages, a chunk of n new tokens; one layer's `Attention._per_sequence`, medians over "
            f"{args.rounds} alternating rounds of 5 calls, {args.threads} torch thread(s). Machine: {machine_line()}.\n\n"
            "| layer | new tokens | masked: gather all, mask, GQA SDPA | split: past + new, LSE merge | "
            "native: pages read in place | masked / split | split / native | max abs diff |\n"
            "|---|---|---|---|---|---|---|---|\n"
            + "".join(f"| {kind} | {n} | {r['masked'] * 1e3:.2f} ms | {r['split'] * 1e3:.2f} ms | "
                      f"{r['native'] * 1e3:.2f} ms | {r['masked'] / r['split']:.2f}x | {r['split'] / r['native']:.2f}x | "
                      f"{r['max_diff']:.1e} |\n" for kind, n, r in rows)
            + f"\nCommand: `{command}`\n")
    print(text)
    if not args.no_write:
        write_section("bench_prefill_attention", "## A prefill chunk's attention over a long cached context (issue 17)\n\n"
                      + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
