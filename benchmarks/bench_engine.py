"""Engine decode benchmark on the `mini` checkpoint: EP = 1, 2, 4 vs transformers' batched generate.

Reports output tokens/s at N concurrent sequences, the per-step split (attention,
experts, shared expert, dense MLP, all-to-all), and the decode step against the machine's floor
(weight bytes the step touches / measured bandwidth, FLOPs / measured matmul rate), all in one run.

EP = 1 runs as `maverick-ray generate --ep 1` does, with no Ray cluster on the machine (an idle
local Ray cluster's daemons take about 7% of a core in wake-ups, which a 2-thread decode step on
a 2-core host can feel; BENCHMARKS.md). EP > 1 needs Ray: every round starts a local cluster and
those engines in a subprocess, runs them, and stops it again before the next round's EP = 1 run.
With a llama.cpp build (benchmarks/llamacpp.py), each round also times llama.cpp's decode at the same
batch (issue 21: every engine figure beside llama.cpp's from the same rounds).
Usage: .venv/bin/python benchmarks/bench_engine.py [--seqs 32 --prompt-len 32 --new-tokens 32 --ep 1 2 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import in_subprocess, machine_line, write_section  # noqa: E402


class EngineRun:
    """One engine (EP=1: kept up across rounds; EP>1: one round); `measure` runs the whole
    prompt set twice: timed as users run it, then instrumented for the per-step split."""

    def __init__(self, ckpt, ep, num_seqs, collectives="auto"):
        from maverick_ray.config import EngineConfig, ParallelConfig
        from maverick_ray.engine.engine import Engine
        from maverick_ray.engine.sampling import SamplingParams

        # max_decode_slowdown 0: the N prompts are admitted together. With prefill pacing, an
        # engine loop that wakes between two add_request calls starts decoding the first prompts
        # and paces the rest in, and a 32-token run may never hold all N at once (no full decode
        # step to time). Decode steps run the same either way.
        self.engine = Engine(ckpt, ParallelConfig(ep_size=ep), EngineConfig(max_num_seqs=num_seqs, max_model_len=256,
                                                                                 cpu_collectives=collectives,
                                                                                 max_decode_slowdown=0),
                             use_ray=ep > 1).start()
        self.engine.generate([11, 12, 13], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        self.steps: list = []
        self.engine.add_step_listener(self.steps.append)

    def warm(self, prompts) -> None:
        """One short untimed pass over the whole prompt set (allocations, first large prefill)."""
        self._run(prompts, 4)

    def measure(self, prompts, new_tokens) -> dict:
        """Throughput, decode step and outputs from a plain pass; the per-step split from a second
        pass with the ranks' module timing hooks on (they cost ~0.2-0.3 ms per `mini` step, so
        nothing else is taken from that pass)."""
        run = self._run(prompts, new_tokens)
        self.engine.ranks.call("enable_phase_timing")
        try:
            decode = self._run(prompts, new_tokens)["decode"]
        finally:
            self.engine.ranks.call("disable_phase_timing")
        split = {}
        for s in decode:
            for k, v in s.phase_seconds.items():
                split.setdefault(k, []).append(v)
            split.setdefault("all-to-all", []).append(max(s.a2a_seconds))
        decode = run.pop("decode")
        return {**run, "step": statistics.median(s.seconds for s in decode) if decode else float("nan"),
                "split": {k: statistics.median(v) for k, v in split.items()},
                "touched": statistics.median(sum(1 for layer in s.expert_counts for c in layer if c) for s in decode)}

    def _run(self, prompts, new_tokens) -> dict:
        """The whole prompt set once: output tokens/s, outputs, and the full decode steps' stats."""
        from maverick_ray.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        first = len(self.steps)
        t0 = time.perf_counter()
        streams = [self.engine.add_request(p, params) for p in prompts]
        outs = [[ev.token_id for ev in s if ev.token_id is not None] for s in streams]
        wall = time.perf_counter() - t0
        decode = [s for s in self.steps[first:] if s.num_seqs == len(prompts) and s.admitted == 0]
        return {"tok_s": sum(map(len, outs)) / wall, "outs": outs, "decode": decode}


def medians_over_rounds(runs: list[dict]) -> dict:
    """Medians over rounds."""
    keys = {k for r in runs for k in r["split"]}
    return {"tok_s": statistics.median(r["tok_s"] for r in runs),
            "step": statistics.median(r["step"] for r in runs),
            "split": {k: statistics.median(r["split"].get(k, 0.0) for r in runs) for k in keys},
            "touched": statistics.median(r["touched"] for r in runs), "outs": runs[-1]["outs"]}


def label(ep: int, collectives: str = "auto") -> str:
    return f"EP={ep}" + (" (gloo)" if collectives == "gloo" else "")


def ray_round(ckpt: str, configs: list[list], seqs: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """One round of the EP > 1 engines, each config [ep, cpu_collectives], on a local Ray cluster
    that lives only for this round (run through in_subprocess). Returns {label: run}."""
    import ray

    from maverick_ray.ray_runtime import init_ray

    init_ray("local", num_cpus=max(ep for ep, _ in configs) + 1)
    try:
        runs = {}
        for ep, collectives in configs:
            eng = EngineRun(ckpt, ep, seqs, collectives)
            try:
                eng.warm(prompts)
                runs[label(ep, collectives)] = eng.measure(prompts, new_tokens)
            finally:
                eng.engine.shutdown()
        return runs
    finally:
        ray.shutdown()


def transformers_generate(ckpt: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """transformers' batched greedy generate, timed after a warm-up (run through in_subprocess)."""
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:2], max_new_tokens=2, **kw)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    return {"tok_s": new.numel() / wall, "outs": new.tolist()}


def write_mini(out: str) -> str:
    from maverick_ray.checkpoint.writer import write_checkpoint

    return str(write_checkpoint(out, "mini", progress=False))


def decode_floor(ckpt, seqs, touched_experts, ctx, flops_rate, bandwidth):
    """Seconds one decode step of `seqs` tokens cannot beat on this machine."""
    from maverick_ray.config import ModelConfig

    t = ModelConfig.from_pretrained(ckpt).text
    C, I = t.hidden_size, t.intermediate_size
    attn = C * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    dense_layers = t.num_hidden_layers - len(t.moe_layers)
    dense = (t.num_hidden_layers * attn + dense_layers * 3 * C * t.intermediate_size_mlp
             + len(t.moe_layers) * (3 * C * I + C * t.num_local_experts) + t.vocab_size * C)
    expert = 3 * C * I
    kv_bytes = 2 * t.num_hidden_layers * seqs * ctx * t.num_key_value_heads * t.head_dim * 4
    bytes_ = (dense + touched_experts * expert) * 4 + kv_bytes
    flops = 2 * seqs * (dense + len(t.moe_layers) * expert) + \
        4 * seqs * ctx * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    return max(bytes_ / bandwidth, flops / flops_rate)


LLAMACPP_RUNS = ("llama.cpp defaults", "llama.cpp f32 KV, FA off")


def find_llamacpp(mode: str):
    """benchmarks/llamacpp.py's build for --llamacpp `mode`, or None (off, not built under auto, or no
    toolchain: said on stdout)."""
    if mode == "off":
        return None
    import llamacpp

    lc = llamacpp.cached_build()
    if lc is None and mode == "on":
        missing = llamacpp.missing_toolchain()
        if missing:
            print(f"llama.cpp left out: it cannot be built here: {missing}", flush=True)
            return None
        lc = llamacpp.ensure_build()
    return lc


def llamacpp_round(lc, gguf: str, args) -> dict:
    """llama.cpp's decode at the engine's batch, prompt and step count, at its defaults and at our numerics
    (f32 KV cache, flash attention off), with torch's thread count: {name: (decode tok/s, s per step)}."""
    import llamacpp

    return {name: llamacpp.decode_rate(llamacpp.batched_bench(lc, Path(gguf), torch.get_num_threads(),
                                                              [args.prompt_len], args.new_tokens, [args.seqs],
                                                              name != LLAMACPP_RUNS[0]), args.seqs)
            for name in LLAMACPP_RUNS}


def llamacpp_ratios(runs: dict, lc_runs: list[dict]) -> str:
    parts = []
    for key, ours in runs.items():
        for name in LLAMACPP_RUNS:
            vals = [lc[name][1] / r["step"] for r, lc in zip(ours, lc_runs)]
            parts.append(f"{key} {statistics.median(vals):.2f}x {name} ({min(vals):.2f}-{max(vals):.2f}x)")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--gloo-ep", type=int, nargs="*", default=[2],
                    help="EP sizes also run with --cpu-collectives gloo, beside the default shared memory")
    ap.add_argument("--rounds", type=int, default=3, help="each configuration runs once per round; medians")
    ap.add_argument("--checkpoint", default=None, help="default: write the mini preset to a temp dir")
    ap.add_argument("--llamacpp", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's decode step at the same batch in every round (benchmarks/llamacpp.py): "
                         "auto uses a cached build (bench_llamacpp.py --build-only makes one, ~10 min), on "
                         "builds it when missing, off leaves it out")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/bench_engine.py"] + (argv if argv is not None else sys.argv[1:]))
    if not args.checkpoint:
        print("writing the mini checkpoint ...", flush=True)
    # Checkpoint writing, machine rates and transformers run in subprocesses: this process's
    # main thread stays free of torch compute (common.in_subprocess says why).
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(
        in_subprocess("bench_engine", "write_mini", str(Path(tempfile.mkdtemp()) / "mini")))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 600, (args.seqs, args.prompt_len), generator=g).tolist()
    lc = find_llamacpp(args.llamacpp)
    gguf = None
    if lc is not None:
        print("converting the checkpoint to f32 GGUF for llama.cpp ...", flush=True)
        gguf = in_subprocess("llamacpp", "convert_in_process", str(lc.vendor), str(ckpt),
                             str(Path(tempfile.mkdtemp()) / "mini-f32.gguf"))
    configs = [(ep, "auto") for ep in args.ep] + [(ep, "gloo") for ep in args.gloo_ep if ep > 1]
    labels = [label(*c) for c in configs]
    ray_configs = [list(c) for c in configs if c[0] > 1]
    runs: dict[str, list[dict]] = {k: [] for k in labels}
    local = None
    if 1 in args.ep:
        print("starting engine EP=1 ...", flush=True)
        local = EngineRun(ckpt, 1, args.seqs)
        local.warm(prompts)
    hf_runs, lc_runs = [], []
    rates, paired = [], {k: [] for k in labels}
    try:
        for rnd in range(args.rounds):  # every configuration once per round: they share the machine's drift
            print(f"round {rnd + 1}/{args.rounds}: machine rates, " + ", ".join(labels) + ", transformers ...",
                  flush=True)
            rates.append(in_subprocess("common", "machine_rates"))
            if local is not None:
                runs["EP=1"].append(local.measure(prompts, args.new_tokens))
            if ray_configs:
                got = in_subprocess("bench_engine", "ray_round", str(ckpt), ray_configs, args.seqs, prompts,
                                    args.new_tokens)
                for k, run in got.items():
                    runs[k].append(run)
            hf_runs.append(in_subprocess("bench_engine", "transformers_generate", str(ckpt), prompts,
                                         args.new_tokens))
            if gguf is not None:
                lc_runs.append(llamacpp_round(lc, gguf, args))
            hf_tok_s = hf_runs[-1]["tok_s"]
            for k in labels:
                paired[k].append(runs[k][-1]["tok_s"] / hf_tok_s)
    finally:
        if local is not None:
            local.engine.shutdown()
    results = {ep: medians_over_rounds(r) for ep, r in runs.items()}
    hf = {"tok_s": statistics.median(r["tok_s"] for r in hf_runs), "outs": hf_runs[-1]["outs"]}
    vs_hf = {ep: statistics.median(v) for ep, v in paired.items()}
    flops_rate = statistics.median(r[0] for r in rates)
    bandwidth = statistics.median(r[1] for r in rates)
    first = labels[0]
    base = results[first]
    same = all(r["outs"] == hf["outs"] for r in results.values())
    ctx = args.prompt_len + args.new_tokens // 2
    floor = decode_floor(ckpt, args.seqs, base["touched"], ctx, flops_rate, bandwidth)
    # Step over floor within each round (that round's step and machine rates), then the median:
    # the host's speed drifts between rounds, like every other ratio here.
    per_round = [r["step"] / decode_floor(ckpt, args.seqs, r["touched"], ctx, fr, bw)
                 for r, (fr, bw) in zip(runs[first], rates)]
    phases = sorted({k for r in results.values() for k in r["split"]})
    lines = ["| run | output tok/s | vs transformers | decode step (median) | " + " | ".join(phases) + " |",
             "|---|---|---|---|" + "---|" * len(phases)]
    for name, r in results.items():
        cells = " | ".join(f"{r['split'].get(k, 0) * 1e3:.1f} ms" for k in phases)
        lines.append(f"| engine {name} | {r['tok_s']:.0f} | {vs_hf[name]:.1f}x | "
                     f"{r['step'] * 1e3:.1f} ms | {cells} |")
    lines.append(f"| transformers generate (batch {args.seqs}) | {hf['tok_s']:.0f} | 1.0x | | " +
                 " | ".join("" for _ in phases) + " |")
    for name in LLAMACPP_RUNS if lc_runs else ():
        lines.append(f"| {name} (decode steps only) | {statistics.median(r[name][0] for r in lc_runs):.0f} | | "
                     f"{statistics.median(r[name][1] for r in lc_runs) * 1e3:.1f} ms | "
                     + " | ".join("" for _ in phases) + " |")
    table = "\n".join(lines)
    summary = [f"- machine: {machine_line()}; matmul {flops_rate / 1e9:.0f} GFLOP/s, bandwidth "
               f"{bandwidth / 1e9:.1f} GB/s (measured in this run)",
               f"- decode step floor at {args.seqs} sequences ({base['touched']:.0f} expert-layer pairs touched): "
               f"{floor * 1e3:.1f} ms (median rates); {first} step / floor = "
               f"{statistics.median(per_round):.2f}x (goal <= 2x; median over rounds of the ratio within each "
               f"round, range {min(per_round):.2f}-{max(per_round):.2f}x)",
               f"- greedy outputs identical across all EP sizes and transformers: {same}"]
    for two in ("EP=2", "EP=2 (gloo)"):
        if "EP=1" in results and two in results:
            kept = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs[two], runs["EP=1"]))
            summary.append(f"- {two} keeps {kept * 100:.0f}% of EP=1 throughput on the same cores (goal >= 80%; "
                           "median over rounds of the ratio within each round)")
    if lc_runs:
        summary.append(f"- decode step against llama.cpp's at {args.seqs} sequences, same rounds (its step / "
                       f"ours, within each round, median and range): " + llamacpp_ratios(runs, lc_runs))
    elif args.llamacpp != "off":
        summary.append("- llama.cpp: not run (no cached build; `--llamacpp on` builds it)")
    if "EP=1" in results:
        summary.append(f"- EP=1 vs transformers: {vs_hf['EP=1']:.1f}x (goal >= 10x; median over rounds of the "
                       "ratio within each round)")
    text = table + "\n\n" + "\n".join(summary)
    print(text)
    if not args.no_write:
        write_section("bench_engine", f"## Engine decode (issue: expert-parallel engine)\n\n`mini` checkpoint "
                      f"(hidden 512, 128 experts, 4 layers), {args.seqs} concurrent sequences, prompt "
                      f"{args.prompt_len} tokens, {args.new_tokens} new tokens each, greedy, fp32, default engine "
                      f"settings (native CPU kernels) but for prefill pacing, off so the prompts are admitted together. Every configuration "
                      f"runs once per round, {args.rounds} rounds: EP=1 in this process with no Ray cluster on the "
                      f"machine (as `generate --ep 1` runs), EP>1 on a local Ray cluster started for each round in a "
                      f"subprocess (all-to-all through shared memory, the default on one host; rows marked gloo "
                      f"with `--cpu-collectives gloo`), transformers in a subprocess, llama.cpp (when built, "
                      f"`--llamacpp`) as llama-batched-bench on the same checkpoint in f32 GGUF at the same batch, "
                      f"prompt and step count, with as many threads; figures are medians over "
                      f"rounds, ratios are taken within a round. Throughput and decode step come from a plain pass; "
                      f"the per-step split columns from a second pass with the ranks' module timing hooks on (medians "
                      f"over full decode steps, max over ranks).\n\n{text}\n\nCommand: "
                      f"`{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
