"""One real-size Maverick MoE layer's routed experts against the HBM roofline, and EP = 1 engine decode.

`layer`: hidden 5120, expert width 8192, 128 experts, top-1, at decode-sized and prefill-sized
token counts. Variants, side by side in one run:
  bf16 loop     the project's own Experts.forward (model/moe.py): one matmul pair per touched expert
  bf16 grouped  torch._grouped_mm over the rows sorted by expert (when this torch has it)
  fp8 loop      torch._scaled_mm per expert: FP8 weights with per-channel scales, dynamic per-token
                activation scales (the official FP8 checkpoint's scheme)
  fp8 grouped   torch._scaled_grouped_mm (when this torch has it)
  bf16 triton   model/triton_experts.py: one program per (expert, output tile) streams the expert's
                weights once for all its rows, gate/up and SiLU fused (when Triton imports)
  fp8 triton    the same kernels over the FP8 weights, weight-only (bf16 activations)
Roofline of a variant = max(weight bytes of the touched experts / measured bandwidth, FLOPs /
measured matmul rate); bandwidth is a large device-to-device copy in the same run (read + write
bytes / time), the matmul rate one large bf16 (and FP8) matmul. "% roofline" = roofline / time.

`engine`: EP = 1 engine decode on a checkpoint (the `mini` preset on GPU, bf16 and FP8): output
tokens/s and the median decode step, as `maverick-ray generate --ep 1` runs it (an FP8 checkpoint's
routed experts stay FP8 on a GPU with FP8 matmuls: the fp8_experts knob's auto).

Both write JSON and a Markdown table to --out. `--cpu-smoke` runs tiny sizes on the CPU (the
test suite runs it); figures from it mean nothing. Usage:
  python benchmarks/bench_moe_layer.py layer --out DIR [--cpu-smoke]
  python benchmarks/bench_moe_layer.py engine --checkpoint DIR --out DIR [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REAL = dict(hidden=5120, inter=8192, experts=128, tokens=[32, 128, 512, 4096], copy_bytes=4 << 30, mm=8192)
SMOKE = dict(hidden=64, inter=64, experts=8, tokens=[4, 16, 64], copy_bytes=16 << 20, mm=256)
FP8_MAX = 448.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over repeats, device-synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device copy (each byte read once and written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 10)


def matmul_rate(device, n: int, fp8: bool = False) -> float | None:
    """FLOP/s of one n x n x n matmul (bf16, or FP8 through torch._scaled_mm); None if unsupported."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    try:
        if fp8:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
            one = torch.ones((), device=device)
            fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        else:
            fn = lambda: a @ b  # noqa: E731
        return 2 * n ** 3 / timed(fn, device, 5)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return None


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: (R, K) -> (R, K) float8_e4m3fn, (R, 1) fp32 scales."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class Layer:
    """Routed-expert weights of one MoE layer: bf16 (E, C, 2I) / (E, I, C) as the checkpoint and
    model/moe.py hold them, FP8 output-major (E, 2I, C) / (E, C, I) with per-channel scales."""

    def __init__(self, E, C, I, device, fp8: bool):
        from maverick_ray.model.moe import Experts

        self.E, self.C, self.I, self.device = E, C, I, device
        gate_up = torch.empty(E, C, 2 * I, dtype=torch.bfloat16, device=device)
        down = torch.empty(E, I, C, dtype=torch.bfloat16, device=device)
        for e in range(E):  # expert by expert: no full-size fp32 temporaries
            gate_up[e].normal_(0, C ** -0.5)
            down[e].normal_(0, I ** -0.5)
        with torch.device("meta"):
            self.experts = Experts(E, C, I)
        self.experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        self.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        self.w13 = self.w2 = None
        if fp8:
            self.w13 = torch.empty(E, 2 * I, C, dtype=torch.float8_e4m3fn, device=device)
            self.w2 = torch.empty(E, C, I, dtype=torch.float8_e4m3fn, device=device)
            for e in range(E):
                self.w13[e] = (gate_up[e].t() * (C ** 0.5)).to(torch.float8_e4m3fn)
                self.w2[e] = (down[e].t() * (I ** 0.5)).to(torch.float8_e4m3fn)
            self.s13 = torch.full((E, 2 * I), C ** -0.5, device=device)
            self.s2 = torch.full((E, C), I ** -0.5, device=device)

    def expert_bytes(self, fp8: bool) -> int:
        n = 3 * self.C * self.I
        return n + 4 * (2 * self.I + self.C) if fp8 else 2 * n

    # -- variants: x (R, C) rows, ids (R,) local expert ids -> (R, C) --------------------------
    def bf16_loop(self, x, ids):
        return self.experts(x, ids)

    def _sorted(self, ids):
        order = torch.argsort(ids, stable=True)
        offs = torch.cumsum(torch.bincount(ids, minlength=self.E), 0).to(torch.int32)
        return order, offs

    def bf16_grouped(self, x, ids):
        order, offs = self._sorted(ids)
        h = torch._grouped_mm(x[order], self.experts.gate_up_proj, offs=offs)       # (R, 2I)
        act = F.silu(h[:, :self.I]) * h[:, self.I:]
        y = torch._grouped_mm(act, self.experts.down_proj, offs=offs)                # (R, C)
        out = torch.empty_like(y)
        out[order] = y
        return out

    def fp8_loop(self, x, ids):
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=self.E).tolist()
        xs, out, start = x[order], torch.empty_like(x), 0
        ys = torch.empty_like(xs)
        for e, n in enumerate(counts):
            if not n:
                continue
            xq, sx = quant_rows(xs[start:start + n])
            h = torch._scaled_mm(xq, self.w13[e].t(), scale_a=sx, scale_b=self.s13[e].view(1, -1),
                                 out_dtype=torch.bfloat16)
            aq, sa = quant_rows(F.silu(h[:, :self.I]) * h[:, self.I:])
            ys[start:start + n] = torch._scaled_mm(aq, self.w2[e].t(), scale_a=sa, scale_b=self.s2[e].view(1, -1),
                                                   out_dtype=torch.bfloat16)
            start += n
        out[order] = ys
        return out

    def fp8_grouped(self, x, ids):
        order, offs = self._sorted(ids)
        xq, sx = quant_rows(x[order])
        h = torch._scaled_grouped_mm(xq, self.w13.transpose(-2, -1), scale_a=sx.view(-1), scale_b=self.s13,
                                     offs=offs, out_dtype=torch.bfloat16)
        aq, sa = quant_rows(F.silu(h[:, :self.I]) * h[:, self.I:])
        y = torch._scaled_grouped_mm(aq, self.w2.transpose(-2, -1), scale_a=sa.view(-1), scale_b=self.s2,
                                     offs=offs, out_dtype=torch.bfloat16)
        out = torch.empty_like(y)
        out[order] = y
        return out


    def _triton(self, x, ids, fp8: bool):
        from maverick_ray.model.moe import expert_row_bounds
        from maverick_ray.model.triton_experts import expert_rows

        order = torch.argsort(ids, stable=True)
        bounds = expert_row_bounds(ids, order, self.E)
        if fp8:
            y = expert_rows(x[order], bounds, self.w13, self.w2, self.s13, self.s2)
        else:
            y = expert_rows(x[order], bounds, self.experts.gate_up_proj, self.experts.down_proj)
        out = torch.empty_like(y)
        out[order] = y
        return out

    def bf16_triton(self, x, ids):
        return self._triton(x, ids, fp8=False)

    def fp8_triton(self, x, ids):
        return self._triton(x, ids, fp8=True)


def run_layer(args) -> dict:
    dims = SMOKE if args.cpu_smoke else REAL
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    E, C, I = dims["experts"], dims["hidden"], dims["inter"]
    tokens = args.tokens or dims["tokens"]
    bw = bandwidth(device, dims["copy_bytes"])
    rate16, rate8 = matmul_rate(device, dims["mm"]), matmul_rate(device, dims["mm"], fp8=True)
    has_fp8 = hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")
    layer = Layer(E, C, I, device, fp8=has_fp8)
    variants = [("bf16 loop", layer.bf16_loop, False), ("bf16 grouped", layer.bf16_grouped, False),
                ("fp8 loop", layer.fp8_loop, True), ("fp8 grouped", layer.fp8_grouped, True)]
    if device.type == "cuda":   # Triton kernels: CUDA only
        variants += [("bf16 triton", layer.bf16_triton, False), ("fp8 triton", layer.fp8_triton, True)]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in tokens:
        ids = torch.randint(0, E, (t,), generator=gen).to(device)   # top-1 routing, uniform
        x = torch.randn(t, C, generator=gen).to(device=device, dtype=torch.bfloat16)
        touched = int(torch.unique(ids).numel())
        ref = layer.bf16_loop(x, ids).float()
        for name, fn, fp8 in variants:
            row = {"tokens": t, "variant": name, "touched_experts": touched}
            rate = (rate8 or (2 * rate16 if rate16 else None)) if fp8 else rate16
            weight_bytes = touched * layer.expert_bytes(fp8)
            floor = max(weight_bytes / bw, 2 * t * 3 * C * I / rate if rate else 0.0)
            try:
                if fp8 and not has_fp8:
                    raise RuntimeError("this torch has no float8 / _scaled_mm")
                got = fn(x, ids).float()
                err = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
                sec = timed(lambda: fn(x, ids), device, args.repeats if t <= 512 else max(3, args.repeats // 4))
                row.update(seconds=sec, roofline_seconds=floor, pct_roofline=100 * floor / sec,
                           weight_gb_s=weight_bytes / sec / 1e9, rel_err_vs_bf16_loop=err)
            except Exception as e:   # a variant this torch / Triton / GPU cannot run: recorded, the rest go on
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dims": {"hidden": C, "inter": I, "experts": E, "top_k": 1},
            "copy_bandwidth_gb_s": bw / 1e9, "bf16_matmul_tflops": (rate16 or 0) / 1e12,
            "fp8_matmul_tflops": (rate8 or 0) / 1e12, "rows": rows}


def layer_markdown(res: dict) -> str:
    lines = [f"MoE layer (routed experts, hidden {res['dims']['hidden']}, width {res['dims']['inter']}, "
             f"{res['dims']['experts']} experts, top-1) on {res['device']}, torch {res['torch']}: copy bandwidth "
             f"{res['copy_bandwidth_gb_s']:.0f} GB/s, bf16 matmul {res['bf16_matmul_tflops']:.0f} TFLOP/s, "
             f"FP8 matmul {res['fp8_matmul_tflops']:.0f} TFLOP/s", "",
             "| tokens | variant | experts touched | ms | roofline ms | % roofline | weight GB/s | rel. err |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['variant']} | {r['touched_experts']} | {r['error']} ||||")
        else:
            lines.append(f"| {r['tokens']} | {r['variant']} | {r['touched_experts']} | {1e3 * r['seconds']:.3f} | "
                         f"{1e3 * r['roofline_seconds']:.3f} | {r['pct_roofline']:.0f}% | {r['weight_gb_s']:.0f} | "
                         f"{r['rel_err_vs_bf16_loop']:.1e} |")
    return "\n".join(lines)


def run_engine(args) -> dict:
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    if args.no_triton:
        from maverick_ray.model import moe

        moe.TRITON_MAX_ROWS_PER_EXPERT = 0   # the EP = 1 engine runs in this process
    device = "cpu" if args.cpu_smoke else "cuda"
    seqs, new = (2, 4) if args.cpu_smoke else (args.seqs, args.new_tokens)
    cfg = EngineConfig(max_num_seqs=seqs, max_model_len=256, device=device, dtype="auto", cuda_graphs=args.cuda_graphs)
    steps: list = []
    with Engine(args.checkpoint, ParallelConfig(ep_size=1), cfg, use_ray=False, progress=False) as eng:
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        eng.generate([11, 12, 13], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        eng.add_step_listener(steps.append)
        prompts = [[10 + (7 * i + j) % 200 for j in range(32)] for i in range(seqs)]
        t0 = time.perf_counter()
        streams = [eng.add_request(p, params) for p in prompts]
        outs = [[ev.token_id for ev in s if ev.token_id is not None] for s in streams]
        wall = time.perf_counter() - t0
        info = eng.ranks.call("info")[0]
        graphs = eng.ranks.call("decode_graph_stats")[0]
    decode = [s.seconds for s in steps if s.num_seqs == seqs and s.admitted == 0]
    return {"checkpoint": str(args.checkpoint), "device": info["device"], "fp8_experts": info["fp8_experts"],
            "cuda_graphs": info["cuda_graphs"], "cuda_graphs_off": info["cuda_graphs_off"], "graph_stats": graphs,
            "triton_experts": not args.no_triton,
            "routed_expert_bytes": info["routed_expert_bytes"], "seqs": seqs, "new_tokens": new,
            "output_tokens_per_s": sum(map(len, outs)) / wall,
            "decode_step_ms_median": 1e3 * statistics.median(decode) if decode else None,
            "decode_steps": len(decode), "all_outputs_full_length": all(len(o) == new for o in outs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("layer", "engine"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="results directory (JSON + Markdown)")
        p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    sub.choices["layer"].add_argument("--tokens", type=int, nargs="*", default=None,
                                      help="token counts (default: 32 128 4096)")
    sub.choices["layer"].add_argument("--repeats", type=int, default=20)
    sub.choices["engine"].add_argument("--checkpoint", required=True)
    sub.choices["engine"].add_argument("--seqs", type=int, default=32)
    sub.choices["engine"].add_argument("--new-tokens", type=int, default=64)
    sub.choices["engine"].add_argument("--cuda-graphs", choices=("auto", "off"), default="auto",
                                       help="the engine's cuda_graphs setting (decode steps replayed from CUDA graphs)")
    sub.choices["engine"].add_argument("--no-triton", action="store_true",
                                       help="routed experts in torch's grouped GEMMs, not the Triton kernels")
    sub.choices["engine"].add_argument("--name", default="engine_decode",
                                       help="results file name (NAME.json), e.g. engine_decode_fp8")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    if args.what == "layer":
        res = run_layer(args)
        (out / "moe_layer.json").write_text(json.dumps(res, indent=2))
        (out / "moe_layer.md").write_text(layer_markdown(res) + "\n")
        print(layer_markdown(res))
    else:
        res = run_engine(args)
        (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
