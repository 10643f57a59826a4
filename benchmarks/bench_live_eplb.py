"""Live expert rebalancing under load: what a rebalance costs the streams it happens under, and
what it buys under a skewed router.

Each round starts a local Ray cluster and an EP engine with redundant slots and `eplb on` in a
subprocess, runs N concurrent greedy streams once without a rebalance (the reference), then
again with a rebalance asked for once the first stream has a quarter of its tokens, planned from
a routing window skewed onto the experts of rank 0 (so the policy moves experts). Per round: the
rebalance's staging time (all ranks, in the background of steps), the swap pause (the one call
between two steps), the extra bytes staged on the busiest rank, slots moved, the longest token
gap of any stream during the rebalance against the reference run's median gap, and whether the
outputs equal the reference. Medians over rounds.

Skewed router (issue 19's benchmark): at --skew-ep ranks with as many redundant slots, a Zipf-shaped
router (Engine.skew_routing) whose hot experts have no copy at the start, a prefill-heavy load,
EPLB off (the static placement) against on (rebalanced once before the measured pass), in the
same rounds: tokens/s, max/mean routed tokens per rank per step, and the busiest rank's routed-
expert time over the mean (phase timing).

The demo model's real routing (issue 22): the same comparison on the trained demo checkpoint
(maverick_ray/demo_model, 16 experts per MoE layer) with its own router, no skew added, under a
mixed workload like a newcomer's: held-out stdlib prose and code to complete, generated chat
questions, and new Pillow pictures asked about (their patch tokens go to the experts that took
images in training).

Prefix caching is off in both comparisons: every pass repeats the same prompts, and cached
prompts would turn the measured pass into a decode-only one.

Usage: .venv/bin/python benchmarks/bench_live_eplb.py [--checkpoint mini --ep 2 --redundant 2 --rounds 3
       --requests 32 --new-tokens 64 --skew-rounds 3 --skew-ep 4 --demo-rounds 3 --demo-ep 4]
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


SKEW = 3.0   # Engine.skew_routing strength (as tests/test_live_eplb.py): balancedness about 0.5 at EP 4


def demo_workload(ckpt: str, tokenizer, model_config, n: int, seed: int = 0) -> list[tuple[list[int], object]]:
    """n (prompt ids, image inputs or None), a quarter each: a held-out prose window and a code
    window to complete (about 400 characters), a chat question, a picture with a question."""
    import base64
    import random

    from maverick_ray.multimodal.prompt import chat_prompt_with_images
    from maverick_ray.train.data_chat import chat_pair
    from maverick_ray.train.data_images import image_example
    from maverick_ray.train.data_text import documents

    rng = random.Random(seed)
    docs = {d: [x for x in documents("held_out") if x.domain == d and len(x.text) > 800] for d in ("prose", "code")}
    out = []
    for i in range(n):
        kind = ("prose", "code", "chat", "picture")[i % 4]
        if kind in docs:
            doc = rng.choice(docs[kind])
            start = rng.randrange(len(doc.text) - 400)
            out.append((tokenizer.encode(doc.text[start:start + 400], add_bos=True), None))
        elif kind == "chat":
            out.append((tokenizer.apply_chat_template([{"role": "user", "content": chat_pair(rng)[1]}]), None))
        else:
            png, question, _ = image_example(rng, size=64)
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            out.append(chat_prompt_with_images([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
                tokenizer, model_config, ckpt))
    return out


def skewed_round(ckpt: str, ep: int, redundant: int, eplb: bool, requests: int, prompt_len: int,
                 new_tokens: int, workload: str = "zipf") -> dict:
    """A prefill-heavy load, EPLB on (rebalanced once, before the measured pass) or off (the
    static placement with the same redundant slots). workload "zipf": prompts of prompt_len
    tokens under a Zipf-skewed router; "demo": the demo checkpoint's own router on
    demo_workload (prompt_len unused)."""
    import ray

    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams
    from maverick_ray.ray_runtime import init_ray

    init_ray("local", num_cpus=ep + 1)
    eng = None
    try:
        par = ParallelConfig(ep_size=ep, redundant_experts=redundant, eplb="on" if eplb else "off",
                             eplb_interval_steps=10**9, spare_ranks=0)
        tokenizer = None
        if workload == "demo":
            from maverick_ray.checkpoint.tokenizer import ChatTokenizer

            tokenizer = ChatTokenizer.from_pretrained(ckpt)
        eng = Engine(ckpt, par, EngineConfig(max_num_seqs=requests, max_model_len=max(prompt_len, 512) + new_tokens + 8,
                                             prefix_caching="off"), tokenizer=tokenizer).start()
        if workload == "demo":
            prompts = demo_workload(ckpt, tokenizer, eng.model_config, requests)
        else:
            eng.skew_routing(SKEW, hottest=redundant)
            vocab = eng.model_config.text.vocab_size
            prompts = [([(11 * i + 3 * j) % (vocab - 8) + 3 for j in range(prompt_len)], None) for i in range(requests)]
        eng.ranks.call("enable_phase_timing")
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        tokens = sum(len(p) + new_tokens for p, _ in prompts)

        def load():
            t0 = time.perf_counter()
            for s in [eng.add_request(p, params, mm_inputs=mm) for p, mm in prompts]:
                for _ in s:
                    pass
            return time.perf_counter() - t0

        load()   # warm-up; with EPLB it fills the window the rebalance plans from
        if eplb:
            eng.eplb.request()
            load()
            if eng.stats()["eplb"]["rebalances"] != 1:
                raise RuntimeError(f"the rebalance did not happen: {eng.stats()['eplb']}")
        steps: list = []
        eng.add_step_listener(steps.append)
        wall = load()
        per_step = []
        for s in steps:
            ranks = [sum(r) for r in s.rank_received]
            if sum(ranks):
                per_step.append(max(ranks) / (sum(ranks) / len(ranks)))
        expert_time = [sum(s.rank_expert_seconds[r] for s in steps) for r in range(ep)]
        totals = [sum(sum(s.rank_received[r]) for s in steps) for r in range(ep)]
        return {"tok_s": tokens / wall, "prompt_tokens": statistics.median(len(p) for p, _ in prompts),
                "max_over_mean_tokens": statistics.median(per_step),
                "max_over_mean_tokens_pass": max(totals) / (sum(totals) / ep),
                "busiest_expert_time_over_mean": max(expert_time) / (sum(expert_time) / ep)}
    finally:
        if eng is not None:
            eng.shutdown()
        ray.shutdown()


def compare(name: str, rounds: int, ckpt: str, ep: int, requests: int, prompt_len: int, workload: str) -> dict:
    """EPLB off and on, `rounds` times (order alternating), each in a subprocess -> {mode: [results]}."""
    out = {"off": [], "on": []}
    for rnd in range(rounds):
        for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            print(f"{name}, EP={ep}, EPLB {mode}, round {rnd + 1}/{rounds} ...", flush=True)
            r = in_subprocess("bench_live_eplb", "skewed_round", ckpt, ep, ep, mode == "on", requests, prompt_len,
                              16, workload)
            out[mode].append(r)
            print(f"    {r['tok_s']:.0f} tok/s, max/mean tokens per rank {r['max_over_mean_tokens']:.2f} "
                  f"(pass {r['max_over_mean_tokens_pass']:.2f}), busiest rank's expert time / mean "
                  f"{r['busiest_expert_time_over_mean']:.2f}", flush=True)
    return out


def comparison_table(runs: dict) -> str:
    sm = lambda mode, k: statistics.median(r[k] for r in runs[mode])  # noqa: E731
    ratios = [on["tok_s"] / off["tok_s"] for on, off in zip(runs["on"], runs["off"])]
    return ("| EPLB | tokens/s | max/mean tokens per rank per step (median step) | max/mean tokens per rank "
            "over the pass | busiest rank's expert time / mean |\n|---|---|---|---|---|\n"
            + "".join(f"| {mode} | {sm(mode, 'tok_s'):.0f} | {sm(mode, 'max_over_mean_tokens'):.2f} | "
                      f"{sm(mode, 'max_over_mean_tokens_pass'):.2f} | "
                      f"{sm(mode, 'busiest_expert_time_over_mean'):.2f} |\n" for mode in ("off", "on"))
            + f"\nThroughput on / off within each round: {', '.join(f'{x:.2f}x' for x in ratios)} "
            f"(median {statistics.median(ratios):.2f}x).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="mini", choices=["tiny", "mini"], help="preset (default: mini)")
    ap.add_argument("--ep", type=int, default=2, help="EP ranks (default: 2)")
    ap.add_argument("--redundant", type=int, default=2, help="redundant expert slots (default: 2)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the rebalance-under-load run, each on a fresh cluster (default: 3; 0 skips)")
    ap.add_argument("--requests", type=int, default=32, help="concurrent greedy streams (default: 32)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    ap.add_argument("--skew-rounds", type=int, default=3,
                    help="rounds of the skewed-router comparison, EPLB off and on in each (default: 3; 0 skips)")
    ap.add_argument("--skew-ep", type=int, default=4, help="EP ranks of the skewed-router comparison (default: 4)")
    ap.add_argument("--skew-requests", type=int, default=16, help="requests per pass of the comparison (default: 16)")
    ap.add_argument("--skew-prompt-len", type=int, default=256, help="prompt tokens (default: 256: prefill-heavy)")
    ap.add_argument("--demo-rounds", type=int, default=3,
                    help="rounds of the comparison on the demo model's real routing (default: 3; 0 skips)")
    ap.add_argument("--demo-ep", type=int, default=4, help="EP ranks of the demo-model comparison (default: 4)")
    ap.add_argument("--demo-requests", type=int, default=32, help="requests per pass of the demo comparison "
                    "(default: 32: a quarter each prose, code, chat, picture)")
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
        skewed = compare("skewed router", args.skew_rounds, ckpt, args.skew_ep, args.skew_requests,
                         args.skew_prompt_len, "zipf")
        from maverick_ray.demo_model import demo_checkpoint_dir

        demo = compare("demo model's routing", args.demo_rounds, str(demo_checkpoint_dir()), args.demo_ep,
                       args.demo_requests, 0, "demo")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = lambda k: statistics.median(r[k] for r in rows) if rows else 0.0  # noqa: E731
    text = "" if not rows else ("| run | staging (beside the steps) | swap pause | extra bytes staged (busiest rank) | slots moved | "
            "longest token gap during | normal token gap | outputs identical |\n|---|---|---|---|---|---|---|---|\n"
            f"| {args.checkpoint} EP={args.ep} +{args.redundant} redundant, {args.requests} streams | "
            f"{med('staging'):.2f} s | {med('swap') * 1e3:.1f} ms | {med('staged_bytes') / 2**20:.1f} MiB | "
            f"{med('moved'):.0f} | {med('max_gap_during') * 1e3:.0f} ms | {med('normal_gap') * 1e3:.0f} ms | "
            f"{sum(r['identical'] for r in rows)}/{len(rows)} |")
    if args.skew_rounds:
        text += (f"\n\nZipf-skewed router (Engine.skew_routing {SKEW}, hot experts uncopied at the start), "
                 f"{args.checkpoint} EP={args.skew_ep} with {args.skew_ep} redundant slots, {args.skew_requests} "
                 f"requests of {args.skew_prompt_len} prompt + 16 new tokens per pass (prefill-heavy, prefix caching "
                 f"off), EPLB off and on in each of {args.skew_rounds} rounds (order alternating), medians:\n\n"
                 + comparison_table(skewed))
    if args.demo_rounds:
        text += (f"\n\nThe demo model's real routing (maverick_ray/demo_model: 16 experts, its own router, no skew "
                 f"added), EP={args.demo_ep} with {args.demo_ep} redundant slots, {args.demo_requests} requests per "
                 "pass, a quarter each held-out prose and code windows to complete, chat questions and 64 px "
                 f"pictures with a question (median prompt {statistics.median(r['prompt_tokens'] for r in demo['off']):.0f} "
                 f"tokens) + 16 new tokens, prefix caching off, EPLB off and on in each of {args.demo_rounds} rounds "
                 "(order alternating), medians:\n\n" + comparison_table(demo))
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
