"""Python side of decode_layer.c: a whole decoder layer of an fp32 CPU decode step in one call.

Shape legend: T tokens (one per sequence), C hidden, E experts, k experts per token.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from pathlib import Path

import torch

from .build import load
from .grouped_experts import BLOCK as EXPERT_BLOCK

log = logging.getLogger(__name__)

_P, _L, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

_SIZES = ("C", "H", "KV", "D", "I", "E", "Ie", "Is", "rows", "block_size", "chunk", "expert_block")
_FLOATS = ("eps", "qk_eps", "floor_scale", "attn_scale", "scale")
_WEIGHTS = ("w_in", "w_qkv", "w_o", "w_post", "inv_freq", "mlp_gate_up", "mlp_down", "router", "shared_gate_up",
            "shared_down", "experts_gate_up", "experts_down", "k_pool", "v_pool",
            "p_qkv", "p_o", "p_mlp_gate_up", "p_mlp_down", "p_router", "p_shared_gate_up", "p_shared_down")
PANEL = 16   # columns of a packed panel (decode_layer.c NB): weights whose width is not a multiple stay unpacked


class _Layer(ctypes.Structure):
    _fields_ = [(n, _L) for n in _SIZES] + [(n, _F) for n in _FLOATS] + [(n, _P) for n in _WEIGHTS]


def _blas() -> int | None:
    """Address of sgemm_ in the BLAS torch's CPU library carries (MKL on x86 wheels): the layer's
    matmuls of more than a few tokens run in the same BLAS, with the same threads, as torch.mm."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        handle = ctypes.CDLL(str(lib))
        return ctypes.cast(handle.sgemm_, _P).value
    except (OSError, AttributeError) as exc:
        log.warning("native decode layer unavailable: no sgemm_ in %s (%s)", lib, exc)
        return None


class DecodeLayerKernel:
    """Runs `DecoderLayer`s of decode steps (one new token per sequence) on fp32 CPU ranks:
    RMSNorm, the fused q/k/v matmul, the attention prologue and cache write, paged attention,
    o_proj + residual, RMSNorm and the dense MLP or the MoE block (router, top-1, the routed
    expert of each token, the shared expert) in one native call. `bind(layer)` gives the
    layer's runner, or None for a layer whose layout it cannot read (that layer stays on torch);
    `stack(runners, norm, lm_head)` runs a whole step of them, and the head, in one call."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.decode_layer_f32
        self._fn.argtypes = [_P, _P, _P, _L, _P, _P, _P, _P, _P, _L, _P, _P, ctypes.c_int]
        self._fn.restype = ctypes.c_int
        self._stack_fn = lib.decode_stack_f32
        self._stack_fn.argtypes = [_P, _L, _P, _P, _P, _L, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        self._stack_fn.restype = ctypes.c_int
        self._pack = lib.decode_layer_pack_panels
        self._pack.argtypes = [_P, _P, _L, _L]
        self._pack.restype = None

    def panels(self, wt: torch.Tensor | None) -> torch.Tensor | None:
        """wt (k, n), fp32 row-major -> the same weight packed in panels of PANEL columns, (n / PANEL, k,
        PANEL), for the layer's 5-32-row matmuls (decode_layer.c: panel_matmul); None when it cannot be
        (another dtype or layout, a width not a multiple of PANEL: that matmul goes to BLAS). The
        panels are a second copy of the weight, made once at bind time."""
        if (wt is None or wt.dim() != 2 or wt.dtype != torch.float32 or not wt.is_cpu or not wt.is_contiguous()
                or wt.shape[1] % PANEL):
            return None
        out = torch.empty(wt.shape[1] // PANEL, wt.shape[0], PANEL)
        self._pack(wt.data_ptr(), out.data_ptr(), wt.shape[0], wt.shape[1])
        return out

    def stack(self, bound: list["BoundDecodeLayer"], norm=None, lm_head=None) -> "DecodeStack":
        """The runner of a whole model's decode step in one call, over every layer's runner; with
        the final `norm` (RMSNorm) and `lm_head` (fused: `wt` (C, V)) it returns logits."""
        return DecodeStack(self, bound, norm, lm_head)

    def bind(self, layer) -> "BoundDecodeLayer | None":
        """`layer`'s runner when its weights have the layout the kernel reads: fp32 CPU, fused for
        inference (model/fused.py), the native attention prologue attached; MoE layers top-1, the
        routed experts in the grouped kernel's layout."""
        attn, ffn = layer.self_attn, layer.feed_forward
        if not (attn.qkv is not None and attn.qkv.dtype == torch.float32 and attn.qkv.is_cpu
                and attn.prologue is not None and getattr(attn.o_proj, "wt", None) is not None):
            return None
        if not layer.is_moe:
            ok = ffn.gate_up is not None and getattr(ffn.down_proj, "wt", None) is not None
            return BoundDecodeLayer(self, layer, False) if ok else None
        shared = ffn.shared_expert   # a MoE layer binds anyway: its attention half at least runs native
        whole = (ffn.top_k == 1 and getattr(ffn.router, "wt", None) is not None and shared.gate_up is not None
                 and getattr(shared.down_proj, "wt", None) is not None)
        return BoundDecodeLayer(self, layer, whole)


class BoundDecodeLayer:
    """One layer's native decode runner (DecodeLayerKernel.bind). Dense layers run whole; MoE
    layers whole too when `runs_moe`, else the call stops after the attention half and the MoE
    block runs on torch (experts on other ranks at EP > 1, a routing test hook)."""

    def __init__(self, kernel: DecodeLayerKernel, layer, moe_layout: bool):
        from ..model.moe import LocalDispatcher

        self._fn, self.layer, self._local = kernel._fn, layer, LocalDispatcher
        self._panels = _layer_panels(kernel, layer, moe_layout)   # name -> packed copy (fixed once loaded)
        self._moe_layout = moe_layout    # a MoE layer's router and shared expert in the layout read
        self._spec: _Layer | None = None
        self._spec_key: tuple = ()
        self.phase: dict | None = None   # RankWorker.enable_phase_timing: native time into "decode_layer"

    def runs_moe(self, tokens: int) -> bool:
        """Whether the MoE block runs in the call too: every expert local (EP = 1, the local
        dispatcher), no routing test hook, the grouped kernel attached (a live swap re-checks
        it) and few enough tokens for it (beyond, per-expert BLAS is faster)."""
        ffn = self.layer.feed_forward
        experts = ffn.experts
        return (self._moe_layout and type(ffn.dispatcher) is self._local
                and getattr(experts, "kernel", None) is not None   # FP8 experts have none: they stay on torch
                and experts.num_local == ffn.num_experts and ffn.force_expert is None and ffn.route_bias is None
                and tokens <= experts.KERNEL_MAX_ROWS_PER_EXPERT * experts.num_local)

    def runs_whole(self, tokens: int, spec: _Layer) -> bool:
        """Whether the call runs the whole layer (a dense one, or a MoE block `runs_moe` with its
        router and experts in `spec`), not only its attention half."""
        return not self.layer.is_moe or (self.runs_moe(tokens) and spec.router is not None)

    def __call__(self, x: torch.Tensor, batch, inv_freq: torch.Tensor, cache, routed_ids: list | None):
        """x (T, C) -> the layer's output (T, C); appends the MoE layer's expert ids (T, 1) to
        routed_ids. The batch must be a decode batch over `cache` (its KVView built)."""
        t0 = time.perf_counter()
        layer = self.layer
        attn = layer.self_attn
        T, C = x.shape
        spec = self._spec_for(inv_freq, cache, batch.kv.block_size)
        _check_hidden(x, spec)
        group = attn.group = cache.group_of(attn.layer)
        kv = batch.kv
        out = torch.empty_like(x)
        whole = self.runs_whole(T, spec)
        ids = torch.empty(T, dtype=torch.int64) if layer.is_moe and whole else None
        y = None if whole else torch.empty_like(x)
        table = kv.table[group]
        rc = self._fn(ctypes.byref(spec), x.data_ptr(), out.data_ptr(), T, batch.positions.data_ptr(),
                      kv.write_rows[group].data_ptr(), table.data_ptr(), kv.first[group].data_ptr(),
                      kv.end.data_ptr(), table.shape[1], None if ids is None else ids.data_ptr(),
                      None if y is None else y.data_ptr(), torch.get_num_threads())
        if rc:
            raise _error(rc, spec.rows)
        if self.phase is not None:
            self.phase["decode_layer"] += time.perf_counter() - t0
        if y is not None:   # the attention half ran: out = h, y = the normed h
            return layer.feed_forward(y, routed_ids, residual=out)
        if ids is not None:
            ffn = layer.feed_forward
            ffn.dispatcher.stats.received_per_layer[ffn.layer] = T
            if routed_ids is not None:
                routed_ids.append(ids.view(T, 1))
        return out

    def _spec_for(self, inv_freq, cache, block_size: int) -> _Layer:
        """The layer's sizes and weight addresses as the C struct, rebuilt when a tensor it points
        into may have been replaced since (the routed experts by a live rebalance, the cache, the
        RoPE frequencies); the other weights are fixed once the model is loaded and fused."""
        layer = self.layer
        k_pool, v_pool = cache.pools(layer.self_attn.layer)
        experts = layer.feed_forward.experts if layer.is_moe and self._moe_layout else None
        if experts is not None and getattr(experts, "kernel", None) is None:
            experts = None   # not in the grouped kernel's layout (FP8 experts): the MoE block stays on torch
        key = (k_pool, v_pool, inv_freq, experts.gate_up_proj, experts.down_proj) if experts else (k_pool, v_pool, inv_freq)
        spec, old = self._spec, self._spec_key
        if (spec is None or spec.block_size != block_size or len(key) != len(old)
                or any(a is not b for a, b in zip(key, old))):
            spec = _spec(layer, inv_freq, k_pool, v_pool, block_size, experts, self._panels)
            self._spec, self._spec_key = spec, key
        return spec


class _Head(ctypes.Structure):
    _fields_ = [("w_norm", _P), ("w_lm", _P), ("p_lm", _P), ("eps", _F), ("V", _L), ("logits", _P)]


class DecodeStack:
    """Every decoder layer of an fp32 CPU decode step in one native call (decode_stack_f32), when
    each runs whole (`BoundDecodeLayer.runs_whole`); else the caller runs them one by one. Saves
    the per-layer Python wrapper, ~35 us a layer (BENCHMARKS.md), which grows with the layer count.
    Given the final norm and lm_head, the same call ends with the logits."""

    def __init__(self, kernel: DecodeLayerKernel, bound: list[BoundDecodeLayer], norm=None, lm_head=None):
        self._fn, self.bound = kernel._stack_fn, bound
        wt = getattr(lm_head, "wt", None)
        self.returns_logits = (norm is not None and wt is not None and wt.dtype == torch.float32 and wt.is_cpu
                               and wt.is_contiguous() and norm.weight.dtype == torch.float32)
        self._norm, self._lm = (norm, lm_head) if self.returns_logits else (None, None)
        self._lm_panels = kernel.panels(wt) if self.returns_logits else None
        self._specs: list[_Layer] = []
        self._layer_ptrs = None                   # (L,) addresses of the layers' structs, for _specs
        self._groups: torch.Tensor | None = None  # (L,) each layer's KV cache group
        self._moe_blocks = [b.layer.feed_forward for b in bound if b.layer.is_moe]
        self.phase: dict | None = None             # RankWorker.enable_phase_timing: native time into "decode_layer"

    def __call__(self, x: torch.Tensor, batch, inv_freq: torch.Tensor, cache, routed_ids: list | None):
        """x (T, C) -> the last layer's output (T, C), or the logits (T, V) when `returns_logits`;
        None when a layer cannot run whole (x is then untouched). Appends each MoE layer's expert
        ids (T, 1) to routed_ids, in layer order."""
        t0 = time.perf_counter()
        T = x.shape[0]
        kv = batch.kv
        specs = [b._spec_for(inv_freq, cache, kv.block_size) for b in self.bound]
        if not all(b.runs_whole(T, s) for b, s in zip(self.bound, specs)):
            return None
        _check_hidden(x, specs[0])
        if len(specs) != len(self._specs) or any(a is not b for a, b in zip(specs, self._specs)):
            self._specs = specs
            self._layer_ptrs = (_P * len(specs))(*(ctypes.addressof(s) for s in specs))
            self._groups = torch.tensor([cache.group_of(b.layer.self_attn.layer) for b in self.bound])
        G = len(kv.table)
        out = torch.empty_like(x)
        ids = torch.empty(len(self._moe_blocks), T, dtype=torch.int64)
        failed = ctypes.c_int64(-1)
        head, logits = None, None
        if self.returns_logits:
            wt = self._lm.wt
            logits = torch.empty(T, wt.shape[1])
            head = _Head(w_norm=self._norm.weight.data_ptr(), w_lm=wt.data_ptr(), eps=self._norm.eps, V=wt.shape[1],
                         p_lm=None if self._lm_panels is None else self._lm_panels.data_ptr(),
                         logits=logits.data_ptr())
        rc = self._fn(self._layer_ptrs, len(specs), self._groups.data_ptr(), x.data_ptr(), out.data_ptr(), T,
                      batch.positions.data_ptr(), (_P * G)(*(w.data_ptr() for w in kv.write_rows)),
                      (_P * G)(*(t.data_ptr() for t in kv.table)), (_P * G)(*(f.data_ptr() for f in kv.first)),
                      kv.end.data_ptr(), (_L * G)(*(t.shape[1] for t in kv.table)), ids.data_ptr(),
                      None if head is None else ctypes.byref(head), ctypes.byref(failed), torch.get_num_threads())
        if rc:
            if failed.value == len(specs):
                raise MemoryError("decode stack: could not allocate the lm_head's scratch buffers")
            raise _error(rc, specs[failed.value].rows)
        if self.phase is not None:
            self.phase["decode_layer"] += time.perf_counter() - t0
        for m, ffn in enumerate(self._moe_blocks):
            ffn.dispatcher.stats.received_per_layer[ffn.layer] = T
            if routed_ids is not None:
                routed_ids.append(ids[m].view(T, 1))
        return out if logits is None else logits


def _check_hidden(x: torch.Tensor, spec: _Layer) -> None:
    if not (x.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and x.shape[1] == spec.C):
        raise ValueError(f"decode layer kernel needs contiguous fp32 CPU hidden states (T, {spec.C}), "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}")


def _layer_weights(layer, moe_layout: bool) -> dict:
    """The layer's projections the call reads, row-major (k, n), by their _Layer names."""
    attn, ffn = layer.self_attn, layer.feed_forward
    w = {"qkv": attn.qkv, "o": attn.o_proj.wt}
    if not layer.is_moe:
        w.update(mlp_gate_up=ffn.gate_up, mlp_down=ffn.down_proj.wt)
    elif moe_layout:
        w.update(router=ffn.router.wt, shared_gate_up=ffn.shared_expert.gate_up,
                 shared_down=ffn.shared_expert.down_proj.wt)
    return w


def _layer_panels(kernel: DecodeLayerKernel, layer, moe_layout: bool) -> dict:
    return {name: p for name, wt in _layer_weights(layer, moe_layout).items()
            if (p := kernel.panels(wt)) is not None}


def _spec(layer, inv_freq, k_pool, v_pool, block_size: int, experts, panels: dict) -> _Layer:
    """experts: the MoE layer's Experts when the call may run the block whole, else None; panels:
    packed copies of the layer's projections by name (see DecodeLayerKernel.panels)."""
    attn, ffn = layer.self_attn, layer.feed_forward
    s = _Layer(C=attn.o_proj.wt.shape[1], H=attn.n_heads, KV=attn.n_kv, D=attn.head_dim, rows=k_pool.shape[0],
               block_size=block_size, chunk=attn.chunk or 0, expert_block=EXPERT_BLOCK,
               eps=layer.input_layernorm.eps, qk_eps=attn.eps if attn.qk_norm else -1.0,
               floor_scale=attn.floor_scale if attn.temperature else 0.0, attn_scale=attn.attn_scale,
               scale=1.0 / math.sqrt(attn.head_dim),
               w_in=layer.input_layernorm.weight.data_ptr(), w_qkv=attn.qkv.data_ptr(),
               w_o=attn.o_proj.wt.data_ptr(), w_post=layer.post_attention_layernorm.weight.data_ptr(),
               inv_freq=inv_freq.data_ptr() if attn.use_rope else None,
               k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr())
    if experts is not None:
        shared = ffn.shared_expert
        s.E, s.Ie, s.Is = experts.num_local, experts.down_proj.shape[1], shared.down_proj.wt.shape[0]
        s.router, s.shared_gate_up = ffn.router.wt.data_ptr(), shared.gate_up.data_ptr()
        s.shared_down = shared.down_proj.wt.data_ptr()
        s.experts_gate_up, s.experts_down = experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr()
    elif not layer.is_moe:
        s.I = ffn.down_proj.wt.shape[0]
        s.mlp_gate_up, s.mlp_down = ffn.gate_up.data_ptr(), ffn.down_proj.wt.data_ptr()
    for name, p in panels.items():
        if name in ("qkv", "o") or experts is not None or not layer.is_moe:
            setattr(s, "p_" + name, p.data_ptr())
    return s


def _error(rc: int, rows: int) -> Exception:
    if rc == 1:
        return IndexError(f"decode layer: a cache write row lies outside the pools' {rows} rows")
    if rc == 2:
        return MemoryError("decode layer: could not allocate its scratch buffers")
    if rc == 3:
        return RuntimeError("decode layer: no BLAS set (decode_layer_set_blas)")
    if rc == 5:
        return ValueError("decode stack: a MoE layer's router and experts are not in its struct")
    return ValueError("decode layer: the attention kernel refused the layer's head layout")


def decode_layer_kernel() -> DecodeLayerKernel | None:
    """The compiled kernel with torch's BLAS attached, or None when either is missing here (logged;
    callers use the torch path)."""
    lib = load("decode_layer")
    blas = _blas() if lib is not None else None
    if blas is None:
        return None
    lib.decode_layer_set_blas.argtypes = [_P]
    lib.decode_layer_set_blas(blas)
    return DecodeLayerKernel(lib)
