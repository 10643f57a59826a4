"""KV cache capacity: the paged cache with Llama 4's local windows against the slot design before paging.

(a) Bytes per sequence for Llama 4 Maverick (configs/models, bf16) at 8k, 32k and 128k tokens:
what the paged cache holds, KVLayout.pages_for_length(n) x page_bytes (model/kv_cache.py: every
token in the global NoPE layers, the current 8192-token attention chunk plus one block in the
chunked RoPE layers), against the slot design before paging, which reserved max_model_len
positions in every layer for every slot (max_model_len = n, and the checkpoint's context).

(b) Sequences held at once in a fixed KV budget per rank (default 16 GiB, bf16) with ~8k-token
contexts, on a `mini`-like config (4 layers, NoPE every 4th: 1 global + 3 chunked, as Maverick's
1:3) with Maverick's attention chunk (8192) and a smaller one (2048) to show the window. Measured
by admitting requests through the real scheduler (engine/scheduler.py Scheduler, its
BlockTables over a real KVLayout), no model: every step is planned and committed, each prompt's
last chunk "samples" a token and the request decodes from then on. Prompts are
context - decode_allowance tokens, each different from its first token on (no shared prefix),
and the prefill budget is large enough that every request is admitted before any context
passes `context` tokens. The count is the requests running once admission stops for lack of
pages (and the largest seen), against the slots the same budget gave the slot design at
max_model_len = 8k (the least that holds these contexts), 32k and 128k (the model's context).

Usage: .venv/bin/python benchmarks/bench_kv_capacity.py [--budget-gib 16 --context 8192 --chunks 8192 2048]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, write_section  # noqa: E402

from maverick_ray.checkpoint.presets import MINI_TEXT  # noqa: E402
from maverick_ray.config import EngineConfig, TextConfig  # noqa: E402
from maverick_ray.engine.request import Request, RequestStream  # noqa: E402
from maverick_ray.engine.sampling import SamplingParams  # noqa: E402
from maverick_ray.engine.scheduler import Scheduler  # noqa: E402
from maverick_ray.model.kv_cache import KVLayout  # noqa: E402
from maverick_ray.plan import load_config  # noqa: E402

GIB = 2 ** 30
DTYPE = torch.bfloat16
BLOCK = 16
MINI_CONTEXT = 131072   # the mini-like config's max_position_embeddings (the slot design's max_model_len)


def slot_bytes(text: TextConfig, max_model_len: int) -> int:
    """One slot of the slot design before paging: K and V of max_model_len positions in every layer."""
    itemsize = torch.empty(0, dtype=DTYPE).element_size()
    return 2 * text.num_hidden_layers * max_model_len * text.num_key_value_heads * text.head_dim * itemsize


def paged_bytes(text: TextConfig, length: int) -> int:
    """What one sequence of `length` tokens holds at most in the paged cache."""
    layout = KVLayout.from_config(text, BLOCK)
    return layout.pages_for_length(length) * layout.page_bytes(DTYPE)


def maverick_table() -> tuple[str, list[dict]]:
    text = load_config("maverick")[0].text
    ctx = text.max_position_embeddings
    rows = []
    for n in (8192, 32768, 131072):
        rows.append(dict(n=n, pages=KVLayout.from_config(text, BLOCK).pages_for_length(n), paged=paged_bytes(text, n),
                         slot_n=slot_bytes(text, n), slot_ctx=slot_bytes(text, ctx)))
    lines = [f"| context | paged: pages | paged: GiB per sequence | slot, max_model_len = context: GiB | paged / slot "
             f"| slot, max_model_len = {ctx} (checkpoint): GiB | paged / that |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['pages']} | {r['paged'] / GIB:.2f} | {r['slot_n'] / GIB:.2f} | "
                     f"{r['paged'] / r['slot_n']:.3f} | {r['slot_ctx'] / GIB:.1f} | {r['paged'] / r['slot_ctx']:.4f} |")
    return "\n".join(lines), rows


def mini_like(chunk: int) -> TextConfig:
    """The mini preset's attention shapes (4 layers, 2 kv heads of 64, NoPE every 4th) with the given
    attention chunk and a 128k context."""
    return TextConfig.from_dict(dict(MINI_TEXT, vocab_size=202048, attention_chunk_size=chunk,
                                     max_position_embeddings=MINI_CONTEXT))


def held_at_once(text: TextConfig, budget: int, context: int, decode_allowance: int, prefill_per_step: int) -> dict:
    """Admits requests of context - decode_allowance prompt tokens through the scheduler until the
    pages run out; returns the count running then, the largest seen, and where the pages went."""
    layout = KVLayout.from_config(text, BLOCK)
    pages = budget // layout.page_bytes(DTYPE)
    engine = EngineConfig(max_num_seqs=10 ** 6, max_waiting=10 ** 6, max_prefill_tokens=prefill_per_step)
    sched = Scheduler(1, engine, layout, pages)
    prompt_len = context - decode_allowance
    # More requests than the pages can hold: each holds at least every block of its global layers.
    n = pages // math.ceil(prompt_len / BLOCK) + 1
    tail = list(range(1000, 1000 + prompt_len - 1))
    reqs = {}
    for i in range(n):  # a different first token each: no two prompts share a block
        rid = f"r{i}"
        reqs[rid] = Request(rid, [10 + i] + tail, SamplingParams(max_tokens=decode_allowance, ignore_eos=True),
                            RequestStream(rid))
        sched.add(reqs[rid])
    steps, peak, t0 = 0, 0, time.perf_counter()
    held = None
    while True:
        plans, admitted = sched.plan()
        sched.commit(plans)
        for p in plans:
            for w in p.work:
                if w.sample:
                    reqs[w.seq_id].output_ids.append(1)
                    sched.first_token(reqs[w.seq_id])
        steps += 1
        peak = max(peak, sched.num_running)
        running = [r for r in reqs.values() if r.rank is not None]
        longest = max((r.cached_tokens + 1 for r in running), default=0)
        if longest > context:
            raise RuntimeError(f"a context passed {context} tokens before the pages ran out: raise the prefill "
                               f"budget or the decode allowance")
        prefilling = sched.num_running - sched.num_decoding
        if sched.num_waiting and not prefilling and admitted == 0:   # the pages ran out
            held = dict(running=sched.num_running, decoding=sched.num_decoding,
                        contexts=(min(r.cached_tokens + 1 for r in running), longest))
            break
    tables = sched.blocks[0]
    return dict(chunk=layout.chunk, pages=pages, page_bytes=layout.page_bytes(DTYPE), held=held["running"],
                decoding=held["decoding"], peak=peak, contexts=held["contexts"], used=tables.used,
                per_seq_formula=layout.pages_for_length(context), preemptions=sched.preemptions, steps=steps,
                requests=n, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=16.0, help="KV budget per rank (default: 16)")
    ap.add_argument("--context", type=int, default=8192, help="tokens of each sequence's context (default: 8192)")
    ap.add_argument("--decode-allowance", type=int, default=32,
                    help="prompts are context - this many tokens; they decode at most this many before the "
                         "count (default: 32)")
    ap.add_argument("--prefill-per-step", type=int, default=1 << 20,
                    help="the scheduler's max_prefill_tokens (default: 1048576, about 128 prompts a step)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 2048], help="attention chunks (default: 8192 2048)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    table_a, _ = maverick_table()
    print("(a) Llama 4 Maverick, bf16, bytes per sequence\n" + table_a + "\n")

    budget = int(args.budget_gib * GIB)
    slot_lens = sorted({args.context, 32768, MINI_CONTEXT})
    results = []
    for chunk in args.chunks:
        text = mini_like(chunk)
        r = held_at_once(text, budget, args.context, args.decode_allowance, args.prefill_per_step)
        r["slots"] = {n: budget // slot_bytes(text, n) for n in slot_lens}
        results.append(r)
        print(f"chunk {chunk}: {r['held']} held ({r['peak']} at most), contexts {r['contexts'][0]}-{r['contexts'][1]}, "
              f"{r['used']} of {r['pages']} pages used, {r['preemptions']} preemptions, {r['steps']} steps, "
              f"{r['seconds']:.1f} s; slots {r['slots']}", flush=True)
    head = ("| attention chunk | pages (bytes each) | sequences held at once (measured) | contexts then | "
            "pages used | plan's count (pages // pages_for_length) | "
            + " | ".join(f"slot design, max_model_len {n}: slots | paged / slots" for n in slot_lens) + " |")
    lines = [head, "|" + "---|" * (6 + 2 * len(slot_lens))]
    for r in results:
        cells = [f"{r['chunk']}", f"{r['pages']} ({r['page_bytes']} B)", f"{r['held']}",
                 f"{r['contexts'][0]}-{r['contexts'][1]}", f"{r['used']}", f"{r['pages'] // r['per_seq_formula']}"]
        for n in slot_lens:
            cells += [f"{r['slots'][n]}", f"{r['held'] / r['slots'][n]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    table_b = "\n".join(lines)
    print("\n(b) sequences held at once\n" + table_b)
    if not args.no_write:
        cmd = " ".join([".venv/bin/python benchmarks/bench_kv_capacity.py"] + (sys.argv[1:] if argv is None else argv))
        seconds = ", ".join(f"{r['seconds']:.1f} s" for r in results)
        write_section("bench_kv_capacity", (
            "## KV cache capacity: paged with local windows vs the slot design (issue 17, benchmark 1)\n\n"
            "(a) Llama 4 Maverick (configs/models, bf16), bytes one sequence holds: paged = "
            "`KVLayout.pages_for_length(n)` x page bytes (blocks of 16 tokens; 12 global layers keep every "
            "token, 36 chunked layers the current 8192-token chunk plus one block); the slot design before "
            "paging reserved max_model_len positions in all 48 layers for every slot.\n\n"
            f"{table_a}\n\n"
            f"(b) Sequences held at once in {args.budget_gib:g} GiB of KV per rank (bf16), contexts of about "
            f"{args.context} tokens, on a `mini`-like config (4 layers, 2 kv heads of 64, NoPE every 4th: 1 "
            f"global + 3 chunked layers, Maverick's ratio; context {MINI_CONTEXT}). Measured through "
            f"`engine/scheduler.py` `Scheduler.plan`/`commit` with a real `KVLayout` and `BlockTables` (no "
            f"model; prefix caching at its default, on, but no two prompts share a block): requests of "
            f"{args.context - args.decode_allowance} prompt tokens, "
            f"max_prefill_tokens {args.prefill_per_step}, admitted until admission stops for lack of pages "
            f"(preemptions by then: below); each admitted request decoded at most "
            f"{args.decode_allowance} tokens by then. The slot design's slots are the budget over one slot's "
            f"bytes (2 x layers x max_model_len x kv heads x head dim x 2 B).\n\n"
            f"{table_b}\n\n"
            "Reading it: with contexts within one attention chunk the chunked layers keep every token, so "
            "the paged cache holds what slots of exactly the context's length would; the gain over the slot "
            "design is its reservation of max_model_len for every slot, and a chunk shorter than the context "
            "adds the window's saving on top (3 of 4 layers keep about one chunk).\n\n"
            f"Preemptions during the fills: {', '.join(str(r['preemptions']) for r in results)}; scheduler "
            f"time: {seconds}. Machine: {machine_line()}.\n\n"
            f"Command: `{cmd}`\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
