"""Inference weight layout: fused projections over column-major weights.

Shape legend: T tokens, C input width, N output width (Nq + Nk + Nv, or 2 * I).

An nn.Linear stores W as (N, C) and computes x @ W.T. For the few-row matmuls of a decode step
(T <= a few dozen), BLAS runs x @ Wt with Wt (C, N) contiguous markedly faster than the
transposed form (BENCHMARKS.md), and one matmul over concatenated weights replaces several
calls. `fuse_projections` rewrites a loaded model in place:

    q_proj, k_proj, v_proj  -> one (C, Nq + Nk + Nv) matrix, split after the matmul
    gate_proj, up_proj      -> one (C, 2I) matrix (dense MLPs and the shared expert)
    every other nn.Linear   -> its weight stored transposed (same values, same shape); the
                               contiguous (C, N) view kept as `linear.wt` for `project`
    routed experts          -> each (C, N) matrix stored output-major (Experts.fuse_projections)

The modules' `weight` parameters become views into the fused storage, so names, shapes and
values of the state dict are unchanged. (On fp32 CPU, prefill-sized matmuls also make a packed
copy for oneDNN on first use: `matmul`.) The math is the same
matmul per output column; results agree with the unfused model to rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def column_major(w: torch.Tensor) -> torch.Tensor:
    """(N, C) weight -> the same values as a (N, C) view of a contiguous (C, N) tensor."""
    return w.detach().t().contiguous().t()


def output_major(w: torch.Tensor) -> torch.Tensor:
    """(E, C, N) stack of x @ W matrices -> the same values as a view of contiguous (E, N, C)."""
    return w.detach().transpose(1, 2).contiguous().transpose(1, 2)


def fuse_columns(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenates bias-free linears' outputs into one contiguous (C, sum N) matrix and makes
    each module's weight a view into it. Returns the fused matrix (use as x @ fused)."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("only bias-free projections are fused")
    fused = torch.cat([lin.weight.detach().t() for lin in linears], dim=1).contiguous()  # (C, sum N)
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[:, start:start + n].t(), requires_grad=False)  # (N, C) view
        start += n
    return fused


# Matmuls of at least this many rows on fp32 CPU run through oneDNN over a packed copy of the
# weight (fewer rows: decode steps, which the native kernels or MKL take). Side by side in one
# process on the AMD EPYC host, mini's projections: 1.1-1.5x MKL's sgemm at 64-2048 rows
# (benchmarks/bench_prefill_kernels.py). The packed copy doubles the dense weights of a CPU rank.
PACKED_MIN_ROWS = 33


@functools.lru_cache(maxsize=None)
def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of the (K, N) weight w, made on first use and again after w changes
    in place (its version counter moves: a state dict loaded into the model)."""
    cached = getattr(w, "_onednn_packed", None)
    if cached is None or cached[0] != w._version:
        cached = (w._version, torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None))
        w._onednn_packed = cached
    return cached[1]


def matmul(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ w (K, N) (+ residual (T, N)), through oneDNN's packed weight for fp32 CPU
    inference of PACKED_MIN_ROWS rows or more, else one mm / addmm."""
    # (a weight made under inference_mode has no version counter to tell a stale packed copy by)
    if (x.shape[0] >= PACKED_MIN_ROWS and x.dtype == torch.float32 and x.is_cpu and x.dim() == 2
            and not torch.is_grad_enabled() and not w.is_inference() and _onednn()):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, _packed(w), None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, _packed(w), None, "add")
    return torch.mm(x, w) if residual is None else torch.addmm(residual, x, w)


def project(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, C) -> linear(x) (+ residual (T, N)), as one dispatched op (mm or addmm) once
    fuse_projections has stored the weight column-major: at decode sizes each dispatched op
    costs more host time than its arithmetic (issue 21). Falls back to the module call (also
    under autograd: `wt` is detached)."""
    wt = getattr(linear, "wt", None)
    if wt is None or x.dim() != 2 or torch.is_grad_enabled():
        y = linear(x)
        return y if residual is None else residual + y
    return matmul(x, wt, residual)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuses q/k/v and gate/up projections and stores the remaining linear weights column-major,
    in place (see module docstring). Idempotent; returns the model."""
    for module in model.modules():
        fuse = getattr(module, "fuse_projections", None)
        if fuse is not None:
            fuse()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous() and module.weight.dim() == 2:
            module.weight = nn.Parameter(column_major(module.weight), requires_grad=False)
        if (isinstance(module, nn.Linear) and module.bias is None and module.weight.dim() == 2
                and module.weight.t().is_contiguous()):
            module.wt = module.weight.detach().t()  # (C, N) view of the same storage
    return model
