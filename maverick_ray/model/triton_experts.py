"""Routed experts at decode sizes as two Triton kernels (CUDA), bf16 or FP8 weights.

Shape legend: Rl rows sorted by expert, C hidden, I expert width, El local experts,
K / N a projection's input / output width, BM x BN output tile, BK the reduction step.

    act = silu(xs @ Wg[e]) * (xs @ Wu[e])     one kernel: gate and up tiles side by side
    out = act @ Wd[e]                         one kernel

At decode sizes each expert sees one or two rows, so a layer is a stream of expert weights: the
time is the weight bytes over the memory bandwidth. torch._grouped_mm streamed them at 57% of an
H200's copy bandwidth at 32 tokens (BENCHMARKS.md). Here one program owns one (expert, N tile)
and walks K once for each 16 of that expert's rows (BM), so at decode sizes each weight byte is
read once (and 1.4-1.5x faster than torch._grouped_mm, at 90-100% of the bandwidth; BENCHMARKS.md).
Experts with no rows cost one bounds load. The grid is fixed (El x N tiles), so the kernels can
be captured in a CUDA graph. FP8 weights (Fp8Experts) are converted to bf16 in registers and
their per-channel scales applied to the fp32 sums: the activations are not quantized.

Weights are addressed through strides, so both layouts run: bf16 experts keep the checkpoint's
(El, K, N) (x @ W), FP8 experts store (El, N, K) with (El, N) scales.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BM = 16   # rows per tile: the smallest tl.dot tile; decode groups hold 1-2 rows

_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4),
                                 (128, 64, 4, 4), (64, 64, 2, 5))]


@triton.jit
def _expert_rows_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, bounds_ptr, N, K, up_offset,
                        stride_xm, stride_we, stride_wk, stride_wn, stride_se, stride_om,
                        GLU: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, DOT_F32: tl.constexpr = False):
    """Program (e, n): rows bounds[e]..bounds[e+1]-1 of x times expert e's weight, columns
    n*BN..; GLU: silu(gate) * up with the up columns `up_offset` further on. DOT_F32: both
    operands in fp32 (the CPU interpreter's dot is wrong on bf16)."""
    dot_dtype = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    e = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    start = tl.load(bounds_ptr + e)
    end = tl.load(bounds_ptr + e + 1)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    n_ok = rn < N
    for m0 in range(start, end, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < end
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(dot_dtype)
            w_tile = w_base + kk[:, None].to(tl.int64) * stride_wk + rn[None, :].to(tl.int64) * stride_wn
            w_ok = k_ok[:, None] & n_ok[None, :]
            acc += tl.dot(x, tl.load(w_tile, mask=w_ok, other=0.0).to(dot_dtype))
            if GLU:
                w_up = tl.load(w_tile + up_offset * stride_wn, mask=w_ok, other=0.0).to(dot_dtype)
                acc_up += tl.dot(x, w_up)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + e * stride_se + rn, mask=n_ok, other=0.0)[None, :]
            if GLU:
                acc_up *= tl.load(scale_ptr + e * stride_se + up_offset + rn, mask=n_ok, other=0.0)[None, :]
        if GLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_tuned_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "GLU", "HAS_SCALE"])(_expert_rows_kernel)


def _interpreted() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1, how the CPU tests run these kernels) has no
    benchmarker for the autotuner: one fixed tile then."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _project(xs: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bounds: torch.Tensor,
             n: int, output_major: bool, glu: bool) -> torch.Tensor:
    """xs (Rl, K) sorted rows -> (Rl, n) through each row's expert's w; output_major: w is
    (El, N, K) (FP8), else (El, K, N); glu: N = 2n (gate, then up), output silu(gate) * up."""
    El = w.shape[0]
    K = xs.shape[1]
    out = torch.empty(xs.shape[0], n, dtype=xs.dtype, device=xs.device)
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if output_major else (w.stride(1), w.stride(2))
    scale_arg = scale if scale is not None else w   # unused without HAS_SCALE
    stride_se = scale.stride(0) if scale is not None else 0

    def grid(meta):
        return (El, triton.cdiv(n, meta["BN"]))

    args = (xs, w, scale_arg, out, bounds, n, K, n if glu else 0,
            xs.stride(0), w.stride(0), stride_wk, stride_wn, stride_se, out.stride(0))
    if _interpreted():
        _expert_rows_kernel[grid](*args, GLU=glu, HAS_SCALE=scale is not None, BM=BM, BN=32, BK=32, DOT_F32=True)
    else:
        _tuned_kernel[grid](*args, GLU=glu, HAS_SCALE=scale is not None, BM=BM)
    return out


def expert_rows(xs: torch.Tensor, bounds: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """xs (Rl, C) rows sorted by local expert, bounds (El + 1,) each expert's first row (and Rl;
    moe.expert_row_bounds)
    -> (Rl, C) = silu(xs Wg) * (xs Wu) @ Wd per row's expert, in xs's dtype.

    bf16 weights: gate_up (El, C, 2I), down (El, I, C). FP8 weights (scales given): gate_up
    (El, 2I, C) with (El, 2I) scales, down (El, C, I) with (El, C) scales."""
    fp8 = gate_up_scale is not None
    inter = (gate_up.shape[1] if fp8 else gate_up.shape[2]) // 2
    C = down.shape[1] if fp8 else down.shape[2]
    act = _project(xs.contiguous(), gate_up, gate_up_scale, bounds, inter, fp8, glu=True)   # (Rl, I)
    return _project(act, down, down_scale, bounds, C, fp8, glu=False)                       # (Rl, C)

