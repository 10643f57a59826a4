"""Routed experts kept in FP8 (compressed-tensors checkpoints), run as FP8 matmuls with dynamic
per-token activation scales (torch._scaled_mm, row-wise scaling).

Shape legend: Rl rows that reach this process's experts, C hidden, I expert width, El experts
held here, K / N a matmul's input / output features.

    x_q, s_x = quantize_rows(x)            per token: s_x = amax|x_row| / 448, x_q = fp8(x / s_x)
    y = (x_q * s_x) @ (W_q * s_w).T        one fp32-accumulated FP8 GEMM, both scales applied
    expert(z) = down(silu(gate(z)) * up(z)) with gate|up one (2I, C) FP8 matrix, down (C, I)

Weights are stored output-major as the checkpoint has them ((N, K) row-major, so W_q.T is the
column-major operand _scaled_mm wants), with one fp32 scale per output row:
gate_up_proj (El, 2I, C), gate_up_proj_scale (El, 2I), down_proj (El, C, I), down_proj_scale
(El, C): the tensors checkpoint.loader.load_state_dict(keep_fp8_experts=True) returns.

Use: build the TextModel on the meta device, `use_fp8_experts(model)`, then load that state dict
(strict). Do not `.to(dtype)` the model afterwards: FP8 buffers are floating point and would be
cast. On Hopper (sm90) batches of up to moe.TRITON_MAX_ROWS_PER_EXPERT rows per expert (decode) run in
model/triton_experts.py's kernels, weight-only FP8 (the weights converted in registers, bf16
activations, no activation quantization), larger ones as grouped FP8 GEMMs over all experts
(torch._scaled_grouped_mm); on other FP8 GPUs (sm89) one torch._scaled_mm pair per touched expert;
on CPU (tests) the same math in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import expert_row_bounds, is_hopper, triton_expert_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max   # 448
_EPS = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> (FP8 (R, K), fp32 scales (R, 1)): one dynamic scale per row (token)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def gemm_out_dtype(device: torch.device) -> torch.dtype:
    """What the FP8 GEMMs write: bf16 on CUDA (row-wise scaled _scaled_mm writes only bf16
    there), fp32 elsewhere (CPU runs keep full precision)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_q (R, K) FP8, x_scale (R, 1) fp32, w_q (N, K) FP8 row-major, w_scale (N,) fp32 ->
    (R, N) = (x_q * x_scale) @ (w_q * w_scale).T (fp32 accumulation) in out_dtype (default
    gemm_out_dtype(device)).

    CUDA: one row-wise scaled FP8 GEMM (torch._scaled_mm). cuBLASLt refuses scale vectors that do
    not start 16-byte aligned (measured on an H100, BENCHMARKS.md), so pass scales made for these
    rows, not a row slice of a larger scale tensor. CPU: the same math in fp32 on the dequantized
    operands (torch's CPU _scaled_mm has no row-wise scales before 2.13)."""
    out_dtype = out_dtype or gemm_out_dtype(x_q.device)
    if x_q.device.type == "cuda":
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)
    return ((x_q.float() * x_scale) @ (w_q.float() * w_scale.view(-1, 1)).t()).to(out_dtype)


def grouped_fp8_available(device: torch.device) -> bool:
    """Whether the experts run as two grouped FP8 GEMMs (torch._scaled_grouped_mm, CUDA sm90):
    4-5x faster than one _scaled_mm per expert on an H100 (BENCHMARKS.md), and no host sync."""
    return device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm") and is_hopper(device)


class Fp8Experts(nn.Module):
    """Drop-in for model.moe.Experts (same forward) over FP8 weights; see the module docstring."""

    def __init__(self, num_local: int, hidden: int, inter: int):
        super().__init__()
        self.register_buffer("gate_up_proj", torch.empty(num_local, 2 * inter, hidden, dtype=FP8))  # (El, 2I, C)
        self.register_buffer("gate_up_proj_scale", torch.empty(num_local, 2 * inter))               # (El, 2I)
        self.register_buffer("down_proj", torch.empty(num_local, hidden, inter, dtype=FP8))         # (El, C, I)
        self.register_buffer("down_proj_scale", torch.empty(num_local, hidden))                     # (El, C)

    @property
    def num_local(self) -> int:
        return self.gate_up_proj.shape[0]

    def fuse_projections(self) -> None:
        """Nothing to fuse: gate and up are one matrix already (model/fused.py calls this)."""

    def use_kernel(self, kernel) -> bool:
        """The native CPU kernel runs fp32 weights only."""
        return False

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x (Rl, C), local_ids (Rl,) -> (Rl, C) in x's dtype; each row through its own expert only."""
        C = self.down_proj.shape[1]
        if x.shape[0] == 0:
            return x.new_zeros(0, C)
        order = torch.argsort(local_ids, stable=True)
        xs = x[order]                                            # (Rl, C) rows sorted by expert
        if grouped_fp8_available(x.device):
            out = self._grouped(xs, local_ids, order)
        else:
            out = self._per_expert(xs, torch.bincount(local_ids, minlength=self.num_local).tolist())
        result = torch.empty(x.shape[0], C, dtype=x.dtype, device=x.device)
        result[order] = out.to(x.dtype)
        return result

    def graph_capturable(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a decode step over these experts can be captured in a CUDA graph (the grouped
        path runs without a host sync; the per-expert loop reads group sizes)."""
        return grouped_fp8_available(device)

    def _grouped(self, xs: torch.Tensor, local_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Both projections as one grouped FP8 GEMM each over all experts (offsets stay on the GPU)."""
        y = triton_expert_rows(xs, local_ids, order, self.gate_up_proj, self.down_proj, self.gate_up_proj_scale,
                               self.down_proj_scale)   # weight-only FP8: bf16 activations, no quantization
        if y is not None:
            return y
        offs = expert_row_bounds(local_ids, order, self.num_local, ends_only=True)   # (El,)
        x_q, x_s = quantize_rows(xs)                             # (Rl, C), (Rl, 1)
        h = torch._scaled_grouped_mm(x_q, self.gate_up_proj.transpose(-2, -1), scale_a=x_s.view(-1),
                                     scale_b=self.gate_up_proj_scale, offs=offs, out_dtype=torch.bfloat16)
        gate, up = h.float().chunk(2, dim=-1)                    # (Rl, I) each
        a_q, a_s = quantize_rows(F.silu(gate) * up)
        return torch._scaled_grouped_mm(a_q, self.down_proj.transpose(-2, -1), scale_a=a_s.view(-1),
                                        scale_b=self.down_proj_scale, offs=offs, out_dtype=torch.bfloat16)

    def _per_expert(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One scaled_mm pair per touched expert; each group's rows quantized on their own (per-row
        scales, so the same values as quantizing all rows at once, in aligned scale tensors)."""
        out = torch.empty(xs.shape[0], self.down_proj.shape[1], dtype=gemm_out_dtype(xs.device), device=xs.device)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            x_q, x_s = quantize_rows(xs[start:start + n])        # (n, C), (n, 1)
            gate, up = scaled_mm(x_q, x_s, self.gate_up_proj[e], self.gate_up_proj_scale[e]).float().chunk(2, dim=-1)
            a_q, a_s = quantize_rows(F.silu(gate) * up)          # (n, I), (n, 1)
            out[start:start + n] = scaled_mm(a_q, a_s, self.down_proj[e], self.down_proj_scale[e])
            start += n
        return out


def use_fp8_experts(model: nn.Module) -> int:
    """Replaces every routed-experts module (model.moe.Experts) of `model` with an Fp8Experts of
    the same size, in place; returns how many. Call on the meta-device model before loading a
    keep_fp8_experts state dict."""
    from .moe import Experts

    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]
    for name, m in swaps:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        hidden, two_i = m.gate_up_proj.shape[1:]
        with torch.device(m.gate_up_proj.device):
            setattr(parent, leaf, Fp8Experts(m.num_local, hidden, two_i // 2))
    return len(swaps)
