"""MoE block benchmark: ours vs transformers' Llama4TextMoe vs the machine's floor (same run).

Floor = max(FLOPs our block performs / measured matmul rate,
            bytes of the weights it touches / measured memory bandwidth).
Usage: .venv/bin/python benchmarks/bench_moe.py [--tokens 256 --hidden 512 --inter 1024 --experts 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import machine_line, matmul_rate, median_time, memory_bandwidth, write_section  # noqa: E402


def build(args):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from maverick_ray.config import TextConfig
    from maverick_ray.model.fused import fuse_projections
    from maverick_ray.model.moe import MoEBlock

    d = dict(hidden_size=args.hidden, intermediate_size=args.inter, intermediate_size_mlp=args.inter,
             num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
             num_local_experts=args.experts, num_experts_per_tok=1, vocab_size=128, interleave_moe_layer_step=1)
    torch.manual_seed(0)
    hf = Llama4TextMoe(Llama4TextConfig(**d)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-2 if p.dim() == 3 else -1] ** 0.5)
    ours = MoEBlock(TextConfig.from_dict(d), layer=0).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, fuse_projections(ours)  # the inference weight layout the engine's ranks use


def floor_seconds(ours, x, flops_rate, bandwidth):
    T, C = x.shape
    with torch.no_grad():
        ids = ours.router(x).argmax(-1)
    touched = int(torch.unique(ids).numel())
    E, _, two_i = ours.experts.gate_up_proj.shape
    inter = two_i // 2
    per_token = 2 * C * E + 3 * 2 * C * inter * 2  # router + shared expert + one routed expert
    flops = T * per_token
    elem = x.element_size()
    weight_bytes = (C * E + 3 * C * inter + touched * 3 * C * inter) * elem
    return max(flops / flops_rate, weight_bytes / bandwidth), flops, weight_bytes, touched


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of our block per round")
    ap.add_argument("--rounds", type=int, default=3, help="rates, ours and transformers once per round; medians")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    hf, ours = build(args)
    x = torch.randn(args.tokens, args.hidden)
    with torch.no_grad():
        diff = (hf(x)[0] - ours(x)).abs().max().item()
    print(f"max abs diff vs transformers: {diff:.2e}", flush=True)
    per_round = []  # (flops_rate, bandwidth, ours, hf): the machine's drift hits all of a round alike
    with torch.no_grad():
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}: machine rates, ours, transformers ...", flush=True)
            rates = matmul_rate(), memory_bandwidth()
            t_ours = median_time(lambda: ours(x), args.repeats, warmup=2)
            t_hf = median_time(lambda: hf(x), max(3, args.repeats // 3), warmup=1)
            per_round.append((*rates, t_ours, t_hf))
    flops_rate, bandwidth, t_ours, t_hf = [statistics.median(r[i] for r in per_round) for i in range(4)]
    floor, flops, wbytes, touched = floor_seconds(ours, x, flops_rate, bandwidth)
    speedup = statistics.median(r[3] / r[2] for r in per_round)
    vs_floor = statistics.median(r[2] / floor_seconds(ours, x, r[0], r[1])[0] for r in per_round)
    rows = [
        ("matmul rate (fp32)", f"{flops_rate / 1e9:.1f} GFLOP/s"),
        ("memory bandwidth", f"{bandwidth / 1e9:.1f} GB/s"),
        ("experts that received tokens", f"{touched} / {args.experts}"),
        ("ours (median)", f"{t_ours * 1e3:.2f} ms"),
        ("transformers Llama4TextMoe (median)", f"{t_hf * 1e3:.2f} ms"),
        ("floor: max(FLOPs/rate, bytes/bandwidth)",
         f"{floor * 1e3:.2f} ms ({flops / 1e9:.2f} GFLOP, {wbytes / 2**20:.0f} MiB of weights)"),
        ("speedup vs transformers (goal >= 30x)", f"{speedup:.1f}x"),
        ("ours / floor (goal <= 1.5x)", f"{vs_floor:.2f}x"),
        ("max abs diff vs transformers", f"{diff:.1e}"),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if not args.no_write:
        write_section("bench_moe", f"## MoE block (issue: text model)\n\n"
                      f"hidden {args.hidden}, expert width {args.inter}, {args.experts} experts, top-1, "
                      f"{args.tokens} tokens, fp32. Machine: {machine_line()}. {args.rounds} rounds, each measuring the "
                      f"machine's rates, our block and transformers' in turn; times are medians over rounds, ratios "
                      f"are taken within a round.\n\n{table}\n\n"
                      f"Command: `.venv/bin/python benchmarks/bench_moe.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
