"""Llama 4 mixture-of-experts block: router -> dispatch -> local experts -> combine (+ shared).

Shape legend: T tokens, C hidden, E routed experts (global), El expert slots held here,
I expert width, k experts per token (top_k; 1 for Llama 4), R = T*k routed rows,
Rl rows that reach this process's experts.

    logits = x @ router.T                     (T, E)
    top_v, top_i = topk(logits, k)            raw logits, no renormalisation
    s = sigmoid(top_v)                        fp32, cast back
    out = shared(x) + sum_k expert_{top_i}(x * s)   the score scales the expert INPUT

Experts run only on the rows routed to them (rows grouped by expert), never the dense
all-experts product. Where the experts live is the dispatcher's business: the block hands it
scaled rows with global expert ids and gets back one output row per routed row, in order.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .fused import matmul, project


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 routing rule. logits (T, E) -> scores (T, k) in logits' dtype, expert ids (T, k)."""
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    if logits.dtype == torch.float32:  # no no-op casts: each is a dispatched op at decode (issue 21)
        return torch.sigmoid(top_v), top_i
    return torch.sigmoid(top_v.float()).to(logits.dtype), top_i


@dataclass
class DispatchStats:
    """One engine step's dispatch figures, reset by Dispatcher.begin_step."""

    seconds: float = 0.0                 # time in collectives
    bytes_sent: int = 0
    received_per_layer: dict[int, int] = field(default_factory=dict)  # MoE layer -> rows my experts got

    def reset(self) -> None:
        self.seconds, self.bytes_sent = 0.0, 0
        self.received_per_layer = {}


class Dispatcher(Protocol):
    """Moves routed rows to the experts that own them and the results back. The rank worker
    calls begin_step once per engine step (every rank alike), then the MoE blocks call
    dispatch/combine once per layer; `stats` holds the step's figures."""

    stats: DispatchStats

    def begin_step(self, max_rows_any_rank: int | None) -> None:
        """Starts a step: resets `stats`; max_rows_any_rank is the most routed rows any rank
        sends in one MoE layer this step (the same on every rank; None when unknown)."""

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, layer: int
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x (R, C), global expert_ids (R,) -> (rows for my experts (Rl, C), LOCAL ids (Rl,), handle).
        A local id indexes this process's `Experts` (one per physical slot, parallel/placement.py)."""

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y (Rl, C) outputs of my experts -> (R, C) outputs for the rows this process routed, in order."""


class LocalDispatcher:
    """Every expert lives in this process: dispatch and combine are identities."""

    def __init__(self):
        self.stats = DispatchStats()

    def begin_step(self, max_rows_any_rank: int | None) -> None:
        self.stats.reset()

    def dispatch(self, x, expert_ids, layer):
        self.stats.received_per_layer[layer] = x.shape[0]
        return x, expert_ids, None

    def combine(self, y, handle):
        return y


class MLP(nn.Module):
    """SwiGLU MLP: (silu(x Wg) * x Wu) Wd. Used for dense layers and the shared expert."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # (C, 2 * inter) once fused (model/fused.py)

    def fuse_projections(self) -> None:
        """One matmul for gate and up at inference (model/fused.py); idempotent."""
        if self.gate_up is None:
            from .fused import fuse_columns

            self.gate_up = fuse_columns([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, C) -> (T, C), plus residual (T, C) when given (added in the down projection)."""
        if self.gate_up is None:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return y if residual is None else residual + y
        gate, up = matmul(x, self.gate_up).chunk(2, dim=-1)  # (T, I) each
        return project(F.silu(gate) * up, self.down_proj, residual)


def expert_row_bounds(local_ids: torch.Tensor, order: torch.Tensor, num_local: int,
                      ends_only: bool = False) -> torch.Tensor:
    """(El + 1,) int32: the first row of each local expert among the rows sorted by `order` (an
    argsort of local_ids (Rl,)), then Rl (model/triton_experts.py's bounds); ends_only: (El,)
    the end row of each, the offsets torch's grouped GEMMs take, as a tensor of its own (not a
    view one element in). A search over the sorted ids, not bincount: CUDA's bincount reads the
    ids' max on the host, a sync that also makes a step impossible to capture in a CUDA graph
    (model/decode_graphs.py)."""
    experts = torch.arange(int(ends_only), num_local + 1, device=local_ids.device, dtype=local_ids.dtype)
    return torch.searchsorted(local_ids[order], experts, out_int32=True)


# Routed-expert batches of at most this many rows per local expert (on average) run in
# model/triton_experts.py's kernels on CUDA (bf16 experts on Hopper, FP8 experts where the grouped
# FP8 GEMM runs); larger ones in torch's grouped GEMMs. 0 turns the kernels off. Measured on an
# H200 on a real-size layer of 128 experts (BENCHMARKS.md): the kernels 1.4-1.5x faster (bf16) and
# 1.2x (FP8) up to 512 rows (4 per expert), 1.8-2.1x slower at 4096 (32 per expert), where they
# read each expert's weights once per 16 rows.
TRITON_MAX_ROWS_PER_EXPERT = 4
_triton_failed: list[str] = []   # why the Triton kernels failed once in this process (then never again)


@functools.lru_cache(maxsize=None)
def _triton_module():
    """model/triton_experts.py, or None where Triton does not import (CPU-only installs)."""
    try:
        from . import triton_experts
    except Exception:  # no triton, or a triton that does not load
        return None
    return triton_experts


def triton_expert_rows(xs: torch.Tensor, local_ids: torch.Tensor, order: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                       down_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """xs (Rl, C) rows sorted by `order` (an argsort of local_ids) through the Triton kernels ->
    (Rl, C) in xs's order; None where they do not apply (CPU, more than TRITON_MAX_ROWS_PER_EXPERT
    rows per expert, no Triton) or failed once (logged; torch's grouped GEMMs then run instead,
    for good)."""
    applies = xs.is_cuda and 0 < xs.shape[0] <= TRITON_MAX_ROWS_PER_EXPERT * gate_up.shape[0] and not _triton_failed
    mod = _triton_module() if applies else None
    if mod is None:
        return None
    try:
        bounds = expert_row_bounds(local_ids, order, gate_up.shape[0])
        return mod.expert_rows(xs, bounds, gate_up, down, gate_up_scale, down_scale)
    except Exception as e:   # a kernel that does not compile on this GPU / Triton: torch's path from now on
        _triton_failed.append(f"{type(e).__name__}: {e}")
        logging.getLogger(__name__).warning("Triton expert kernels failed, using torch's grouped GEMMs: %s",
                                            _triton_failed[0])
        return None


def is_hopper(device: torch.device) -> bool:
    """Whether `device` is a Hopper GPU (sm90), where torch's grouped GEMMs run."""
    return device.type == "cuda" and _capability(device.index) == (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class Experts(nn.Module):
    """The routed experts held by this process, fused as in HF checkpoints (used as x @ W;
    stored output-major once `fuse_projections` has run).

    Few-row inference batches (decode) run in the native grouped kernel when one is attached
    (`use_kernel`): one OpenMP region over all touched experts, each thread streaming whole runs
    of expert matrices. Otherwise expert groups run one BLAS call after another in the calling
    thread. (Running them on a Python
    thread pool was tried and removed: on CPU every thread that calls into BLAS gets its own
    OpenMP team, and once a process has more OpenMP threads than cores libgomp stops spinning
    and sleeps between parallel regions, which cost more than the overlap gained; BENCHMARKS.md.)
    """

    # The native kernel runs batches of up to this many rows per local expert (on average), more
    # go to BLAS. Measured (BENCHMARKS.md): on an Intel host BLAS was 1.08x faster at 4 rows per
    # expert; on an AMD EPYC host, where MKL is slow at few rows, the kernel (with its register
    # tiles from 8 rows a pass) was 2.2-3x faster at 4, 1.7x at 16 and 1.6x at 32; at 64 one run
    # had it 1.5x faster and another MKL 1.1x (prefill chunks of 512-8192 tokens over 128 experts;
    # benchmarks/bench_prefill_kernels.py).
    KERNEL_MAX_ROWS_PER_EXPERT = 32

    def __init__(self, num_local: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, hidden, 2 * inter))  # (El, C, 2I)
        self.down_proj = nn.Parameter(torch.empty(num_local, inter, hidden))         # (El, I, C)
        self.kernel = None  # native grouped-experts kernel (native/grouped_experts.py), see use_kernel

    @property
    def num_local(self) -> int:
        return self.gate_up_proj.shape[0]

    def fuse_projections(self) -> None:
        """Inference layout (model/fused.py): each expert matrix stored output-major, i.e. the
        (C, 2I) and (I, C) parameters become views of contiguous (2I, C) and (C, I) storage.
        Shapes, values and state-dict names are unchanged. MKL runs the few-row matmuls of routed
        groups (1-4 rows each) faster over this layout (BENCHMARKS.md); on GPU the checkpoint's
        layout is kept. Idempotent."""
        from .fused import output_major

        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            if w.device.type == "cpu" and w.is_contiguous() and w.shape[1] > 1:
                setattr(self, name, nn.Parameter(output_major(w), requires_grad=False))

    def use_kernel(self, kernel) -> bool:
        """Runs few-row inference batches through `kernel` (a native.grouped_experts.GroupedExperts)
        when it supports these weights (fp32, CPU, fused layout); returns whether it does."""
        self.kernel = kernel if kernel is not None and kernel.supports(self.gate_up_proj, self.down_proj) else None
        return self.kernel is not None

    def _run_groups(self, xs: torch.Tensor, out: torch.Tensor, groups: list[tuple[int, int, int]]) -> None:
        """groups: (local expert, first row, rows) over xs (rows sorted by expert) -> out."""
        if torch.is_grad_enabled():  # out= writes have no autograd
            for e, start, n in groups:
                gate, up = (xs[start:start + n] @ self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, I) each
                out[start:start + n] = (F.silu(gate) * up) @ self.down_proj[e]
            return
        # Inference: every group's gate/up first, one SwiGLU over all rows, then every group's
        # down projection (fewer ops per group than a per-group pipeline).
        two_i = self.gate_up_proj.shape[-1]
        h = xs.new_empty(xs.shape[0], two_i)  # (Rl, 2I)
        for e, start, n in groups:
            torch.mm(xs[start:start + n], self.gate_up_proj[e], out=h[start:start + n])
        act = F.silu(h[:, :two_i // 2]).mul_(h[:, two_i // 2:])  # (Rl, I)
        for e, start, n in groups:
            torch.mm(act[start:start + n], self.down_proj[e], out=out[start:start + n])

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x (Rl, C), local_ids (Rl,) -> (Rl, C); each row through its own expert only."""
        if x.shape[0] == 0:
            return x.new_zeros(0, self.down_proj.shape[-1])
        if (self.kernel is not None and x.shape[0] <= self.KERNEL_MAX_ROWS_PER_EXPERT * self.num_local
                and not torch.is_grad_enabled()):
            return self.kernel(x, local_ids, self.gate_up_proj, self.down_proj)
        order = torch.argsort(local_ids, stable=True)
        if self._grouped_gemm(x):
            return self._grouped(x, local_ids, order)
        counts = torch.bincount(local_ids, minlength=self.num_local).tolist()
        groups, start = [], 0
        for e, n in enumerate(counts):
            if n:
                groups.append((e, start, n))
                start += n
        xs = x[order]
        out = torch.empty_like(xs)
        self._run_groups(xs, out, groups)
        result = torch.empty_like(out)
        result[order] = out
        return result


    def graph_capturable(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether inference on `dtype` inputs here runs the grouped path (_grouped_gemm), the only
        one without a host sync (the per-expert loop reads group sizes), so that a decode step
        over these experts can be captured in a CUDA graph."""
        return (device.type == "cuda" and dtype == torch.bfloat16 and self.gate_up_proj.dtype == torch.bfloat16
                and hasattr(torch, "_grouped_mm") and is_hopper(device))

    def _grouped_gemm(self, x: torch.Tensor) -> bool:
        """bf16 inference on Hopper: each projection as one grouped GEMM over all experts
        (torch._grouped_mm): no per-expert launches, no host sync on the group sizes; 8% faster
        than the per-expert loop on a real-size layer on an H100 (BENCHMARKS.md)."""
        return not torch.is_grad_enabled() and self.graph_capturable(x.device, x.dtype)

    def _grouped(self, x: torch.Tensor, local_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        xs = x[order]                                                                # (Rl, C) sorted
        y = triton_expert_rows(xs, local_ids, order, self.gate_up_proj, self.down_proj)
        if y is None:
            y = self._grouped_mm(xs, local_ids, order)
        out = torch.empty_like(y)
        out[order] = y
        return out

    def _grouped_mm(self, xs: torch.Tensor, local_ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        offs = expert_row_bounds(local_ids, order, self.num_local, ends_only=True)   # (El,)
        h = torch._grouped_mm(xs, self.gate_up_proj, offs=offs)                      # (Rl, 2I)
        two_i = h.shape[-1]
        act = F.silu(h[:, :two_i // 2]) * h[:, two_i // 2:]                          # (Rl, I)
        return torch._grouped_mm(act, self.down_proj, offs=offs)                      # (Rl, C)


class MoEBlock(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, num_local_experts: int | None = None,
                 dispatcher: Dispatcher | None = None):
        super().__init__()
        self.layer, self.top_k, self.num_experts = layer, cfg.num_experts_per_tok, cfg.num_local_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        local = cfg.num_local_experts if num_local_experts is None else num_local_experts
        self.experts = Experts(local, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()
        self.force_expert: int | None = None  # test hook: route every token to this expert
        self.route_bias: torch.Tensor | None = None  # test hook: (E,) added to the router logits (skew)

    def forward(self, x: torch.Tensor, routed_ids: list | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, C) -> (T, C), plus residual (T, C) when given. Appends this layer's routed expert ids (T, k) to routed_ids (the
        rank worker counts them per expert and per token class: engine/token_classes.py)."""
        T, C = x.shape
        logits = project(x, self.router)                         # (T, E)
        if self.force_expert is not None:
            logits = torch.full_like(logits, -1e4)
            logits[:, self.force_expert] = 0.0
        elif self.route_bias is not None:
            logits = logits + self.route_bias.to(logits.device, logits.dtype)
        scores, ids = route(logits, self.top_k)                  # (T, k), (T, k)
        if routed_ids is not None:
            routed_ids.append(ids)
        if self.top_k == 1:
            rows, ids = x * scores, ids.view(T)                  # (T, C) scaled inputs, (T,)
        else:
            rows = x[:, None, :] * scores[:, :, None]            # (T, k, C) scaled inputs
            rows, ids = rows.reshape(T * self.top_k, C), ids.reshape(-1)
        local_rows, local_ids, handle = self.dispatcher.dispatch(rows, ids, self.layer)
        local_out = self.experts(local_rows, local_ids)          # (Rl, C)
        routed = self.dispatcher.combine(local_out, handle)       # (R, C)
        if self.top_k > 1:
            routed = routed.view(T, self.top_k, C).sum(1)         # (T, C)
        return self.shared_expert(x, residual).add_(routed)
