"""One expert-parallel rank: the dense weights, its shard of the routed experts, its KV cache.

A RankWorker runs in-process (EP = 1) or inside a Ray actor (engine/ranks.py). Every
step, all ranks run one forward over their own sequences in lockstep (an empty batch when a
rank has none: the all-to-all is collective), sample the next token of each sequence, and
return the tokens with the step's routing statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import EngineConfig, ModelConfig
from ..model.batch import ForwardBatch
from ..model.fused import fuse_projections
from ..model.kv_cache import KVLayout, KVView, PagedKVCache
from ..model.moe import Dispatcher, LocalDispatcher
from ..model.text import TextModel
from ..parallel.all_to_all import AllToAllDispatcher
from ..parallel.placement import ExpertPlacement
from .sampling import SamplingParams
from .step_types import RankPlan, RankResult
from .token_classes import RoutingTally, token_class_table

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(engine: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = engine.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = engine.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), DTYPES[dtype]


class RankWorker:
    def __init__(self, checkpoint: str | Path, rank: int, placement: ExpertPlacement, engine: EngineConfig,
                 dist_address: str | None = None, progress: bool = False, kv_pages: int | None = None):
        """kv_pages: the KV cache's size in pages (a replacement rank gets its group's); None:
        from the settings (engine/kv_budget.py)."""
        self.rank, self.world = rank, placement.world_size
        self.engine = engine
        self.placement = placement
        self.device, self.dtype = resolve_device_dtype(engine)
        self.checkpoint = Path(checkpoint)
        self.config = ModelConfig.from_pretrained(checkpoint)
        dispatcher: Dispatcher = LocalDispatcher()
        self.collectives = None  # how the EP group's all-to-all travels (set by _init_distributed)
        self.start_seconds: dict[str, float] = {}  # where this rank's start-up went (group_init, weight_load)
        if self.world > 1:
            t0 = time.perf_counter()
            self._init_distributed(dist_address)
            dispatcher = AllToAllDispatcher(self.placement, self.rank)
            self.start_seconds["group_init"] = time.perf_counter() - t0
        self.dispatcher = dispatcher
        self.native_experts = False  # routed experts run in the native CPU kernel (set by _load)
        self.native_rms_norm = False  # RMSNorms run in the native CPU kernel (set by _load)
        self.native_attention_prologue = False  # RoPE/QK norm/temperature/cache write in one native call (_load)
        t0 = time.perf_counter()
        self.model = self._load(Path(checkpoint), progress)
        self._moe_layers = [b.layer for b in self.model.moe_blocks]  # once: the property builds a list per call
        self.start_seconds["weight_load"] = time.perf_counter() - t0
        self.cache = self._new_cache(kv_pages)
        self.native_paged_attention = False  # decode and short-chunk attention read pages in place (native kernel)
        self.native_decode_layers = 0  # layers whose decode steps run in one native call each
        if self.engine.cpu_kernels == "auto" and self.device.type == "cpu" and self.dtype == torch.float32:
            from ..native.paged_attention import paged_attention_kernel

            self.cache.attention_kernel = paged_attention_kernel()
            self.native_paged_attention = self.cache.attention_kernel is not None
            self._attach_decode_layers()
        self.graphs = None   # model/decode_graphs.py DecodeGraphs: decode steps from CUDA graphs
        self.graphs_off = "cuda_graphs is off" if self.engine.cuda_graphs == "off" else "not a GPU rank"  # why none
        if self.device.type == "cuda" and self.engine.cuda_graphs == "auto":
            self.graphs_off = self.use_decode_graphs()
        self.params: dict[str, SamplingParams] = {}
        self.tally = RoutingTally(token_class_table(self.checkpoint, self.config.text.vocab_size,
                                                    self.config.image_token_id), self.config.text.num_local_experts)
        self.vision = None  # built lazily by the vision path when a prompt carries images
        self._phase = defaultdict(float)
        self._fail_in: tuple[int, str] | None = None  # test hook: (steps left, message)
        self._stall_in: tuple[int, float] | None = None  # test hook: (steps left, seconds)
        self._profile_hooks = []

    def _new_cache(self, pages: int | None) -> PagedKVCache:
        from .kv_budget import kv_pages

        layout = KVLayout.from_config(self.config.text, self.engine.kv_block_size)
        if pages is None:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            pages = kv_pages(self.engine, self.config.text, layout, self.dtype, self.device, free)
        # GPU ranks keep a scratch page for the padded rows of CUDA-graph decode steps
        return PagedKVCache(layout, pages, self.dtype, self.device, scratch_page=self.device.type == "cuda")

    def _init_distributed(self, address: str | None) -> None:
        import deepspeed

        from ..parallel import host_group

        if address is None:
            raise ValueError("an expert-parallel group of more than one rank needs a rendezvous address")
        if self.device.type == "cuda":
            backend = "nccl"
        elif self.engine.cpu_collectives == "auto":
            backend = host_group.register()   # shared-memory all-to-all when the ranks share a host
        else:
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend, init_method=address, rank=self.rank,
                                   world_size=self.world, auto_mpi_discovery=False, verbose=False)
        if getattr(torch.distributed.group.WORLD, "shared_memory", False):
            self.collectives = "shared memory"
        else:   # NCCL, gloo by choice, or the host group's gloo fallback (its log says why)
            self.collectives = "nccl" if backend == "nccl" else "gloo"

    def leave_group(self) -> None:
        """Leaves the collective group after a peer failed; this rank keeps its weights and KV
        cache. Called once the failed step has ended on this rank."""
        import deepspeed.comm as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a group broken by the failure: nothing left to tear down cleanly
                log.warning("rank %d: leaving the broken group: %s: %s", self.rank, type(e).__name__, e)

    def join_group(self, address: str) -> dict:
        """Joins a fresh collective group (a new rendezvous at `address`) beside replacement
        ranks, keeping this rank's weights, KV cache and sampling state; returns info()."""
        self.leave_group()
        t0 = time.perf_counter()
        self._init_distributed(address)
        self.start_seconds = {"group_init": time.perf_counter() - t0}
        return self.info()

    @property
    def in_collective(self) -> bool:
        """Whether this rank's step is inside an all-to-all now, waiting for its peers (read
        from another thread when a step hangs: a rank that is not is the one they wait for)."""
        return bool(getattr(self.dispatcher, "in_collective", False))

    def _load(self, checkpoint: Path, progress: bool) -> TextModel:
        from ..checkpoint.loader import load_state_dict

        from ..parallel.slot_weights import to_slot_order

        experts = self.placement.experts_of(self.rank)  # the expert of each slot (replicas may repeat one)
        self.fp8_experts = self._keeps_fp8_experts(checkpoint)
        state = load_state_dict(checkpoint, self.config, expert_ids=experts, dtype=self.dtype,
                                include_vision=False, progress=progress, keep_fp8_experts=self.fp8_experts)
        state = to_slot_order(state, experts)  # the loader reads each expert once, in id order
        with torch.device("meta"):
            model = TextModel(self.config.text, expert_ids=experts, dispatcher=self.dispatcher)
        if self.fp8_experts:
            from ..model.fp8_experts import use_fp8_experts

            use_fp8_experts(model)   # FP8 buffers: the .to(device) below moves them and keeps their dtype
        model.load_state_dict(state, strict=True, assign=True)
        del state  # the model holds the tensors now; the re-layout below then frees each original
        model = fuse_projections(model.to(self.device).eval())  # after .to(): fused weights share storage
        if self.engine.cpu_kernels == "auto" and self.device.type == "cpu" and self.dtype == torch.float32:
            self._attach_cpu_kernels(model)
        return model

    def _keeps_fp8_experts(self, checkpoint: Path) -> bool:
        """Whether this rank runs its routed experts as FP8 matmuls (the fp8_experts knob): only
        for an FP8 checkpoint; auto means on a GPU with FP8 matmuls (compute capability 8.9+)."""
        from ..checkpoint.fp8 import read_quant_config

        mode = self.engine.fp8_experts
        if mode == "off" or read_quant_config(checkpoint) is None:
            return False
        if mode == "on":
            return True
        return self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) >= (8, 9)

    def _attach_cpu_kernels(self, model: TextModel) -> None:
        """Native fp32 CPU kernels (maverick_ray/native): the routed experts of decode steps, RMSNorm,
        the attention prologue (RoPE, QK norm, temperature, cache write)."""
        from ..model.norm import RMSNorm
        from ..native.attention_prologue import attention_prologue_kernel
        from ..native.grouped_experts import grouped_experts_kernel
        from ..native.rms_norm import rms_norm_kernel

        experts = grouped_experts_kernel()
        self.native_experts = all([b.experts.use_kernel(experts) for b in model.moe_blocks])
        norm = rms_norm_kernel()
        self.native_rms_norm = all([m.use_kernel(norm) for m in model.modules() if isinstance(m, RMSNorm)])
        prologue = attention_prologue_kernel()
        self.native_attention_prologue = all([layer.self_attn.use_prologue(prologue) for layer in model.model.layers])
        used = [name for name, on in (("routed experts of decode steps", self.native_experts),
                                      ("RMSNorm", self.native_rms_norm),
                                      ("attention prologue", self.native_attention_prologue)) if on]
        if used:
            log.info("rank %d: native CPU kernels for %s", self.rank, ", ".join(used))

    def _attach_decode_layers(self) -> None:
        """Whole decoder layers of decode steps in one native call each (native/decode_layer.py),
        on top of the per-op kernels: needs the native paged attention and the prologue."""
        if not (self.native_paged_attention and self.native_attention_prologue):
            return
        from ..native.decode_layer import decode_layer_kernel

        kernel = decode_layer_kernel()
        layers = self.model.model.layers
        self.native_decode_layers = sum([layer.use_decode_kernel(kernel) for layer in layers])
        if kernel is not None and self.native_decode_layers == len(layers):   # steps where all run whole: one call
            self.model.decode_stack = kernel.stack([layer.decode_kernel for layer in layers], self.model.model.norm,
                                                   self.model.lm_head)
        if self.native_decode_layers:
            log.info("rank %d: %d of %d decoder layers run decode steps in one native call", self.rank,
                     self.native_decode_layers, len(layers))

    def use_decode_graphs(self, capture: bool = True) -> str | None:
        """Runs decode steps through DecodeGraphs (model/decode_graphs.py), replayed from CUDA
        graphs when `capture` (capture=False runs the same padded steps without graphs: the CPU
        tests' way to check them). Returns why it cannot (None: it will)."""
        from ..model.decode_graphs import DecodeGraphs

        if self.world > 1:
            return "expert parallelism: each all-to-all's sizes are read on the host"
        if capture and not all(b.experts.graph_capturable(self.device, self.dtype) for b in self.model.moe_blocks):
            return "the routed experts are not grouped GEMMs here (they are on Hopper, in bf16 or FP8)"
        if self.cache.scratch_page is None:   # a CPU rank's cache (tests): the same pages plus the scratch one
            kernel = self.cache.attention_kernel
            self.cache = PagedKVCache(self.cache.layout, self.cache.num_pages, self.dtype, self.device,
                                      scratch_page=True)
            self.cache.attention_kernel = kernel
        self.graphs = DecodeGraphs(self.model, self.cache, self.engine.max_num_seqs, capture=capture)
        return None

    def decode_graph_stats(self) -> dict | None:
        """DecodeGraphs.stats() (graphs captured, buckets, replays, why capture failed); None without."""
        return self.graphs.stats() if self.graphs is not None else None

    # ---- live rebalancing (engine/live_eplb.py, engine/expert_swap.py) ---------------------
    _staging: dict | None = None   # {"placement", "thread", "staged", "error"} of the rebalance in progress

    def stage_placement(self, placement: ExpertPlacement) -> None:
        """Starts building this rank's slot weights for `placement` on a thread of its own; the
        rank keeps serving steps meanwhile. staging_status() says when they are ready."""
        import threading

        from .expert_swap import stage

        def build(entry):
            try:
                entry["staged"] = stage(self.model, self.checkpoint, self.config, self.rank, self.placement,
                                        placement, self.dtype, self.fp8_experts)
            except Exception as e:  # reported by staging_status; the rebalance is dropped
                entry["error"] = f"{type(e).__name__}: {e}"

        entry = {"placement": placement, "staged": None, "error": None}
        entry["thread"] = threading.Thread(target=build, args=(entry,), name=f"maverick-stage{self.rank}", daemon=True)
        self._staging = entry
        entry["thread"].start()

    def staging_status(self) -> dict:
        """{"state": none | staging | ready | failed, "error", "nbytes", "seconds", "loaded_experts"}."""
        entry = self._staging
        if entry is None:
            return {"state": "none"}
        if entry["error"] is not None:
            return {"state": "failed", "error": entry["error"]}
        staged = entry["staged"]
        if staged is None:
            return {"state": "staging"}
        return {"state": "ready", "nbytes": staged.nbytes, "seconds": staged.seconds,
                "loaded_experts": staged.loaded_experts, "moved_bytes": staged.moved_bytes}

    def swap_placement(self, placement: ExpertPlacement) -> dict:
        """Serves `placement` from the next step on: swaps in the weights staged for it (staging
        them now, blocking, when they are not), frees the old ones and routes by it. Idempotent:
        a rank that holds `placement` already does nothing ({"swapped": False})."""
        from .expert_swap import apply, stage

        if placement == self.placement:
            self._staging = None
            return {"swapped": False}
        entry = self._staging
        if entry is not None and entry["placement"] == placement:
            entry["thread"].join()
        staged = entry["staged"] if entry is not None and entry["placement"] == placement else None
        if staged is None:
            staged = stage(self.model, self.checkpoint, self.config, self.rank, self.placement, placement,
                           self.dtype, self.fp8_experts)
        self._staging = None
        apply(self.model, staged, self.rank)
        if self.graphs is not None:   # graphs replay the old weights' addresses
            self.graphs.clear()
        self.placement = placement
        self.dispatcher.set_placement(placement)
        return {"swapped": True, "nbytes": staged.nbytes, "loaded_experts": staged.loaded_experts}

    def drop_staged(self) -> None:
        """Forgets a staged rebalance (its thread, if still running, finishes into nothing)."""
        self._staging = None

    # ---- introspection -------------------------------------------------------------------
    def routed_expert_bytes(self) -> int:
        """Bytes of this rank's routed-expert weights (FP8 experts hold theirs, and scales, as buffers)."""
        return sum(t.numel() * t.element_size() for b in self.model.moe_blocks
                   for t in (*b.experts.parameters(), *b.experts.buffers()))

    def info(self) -> dict:
        import os
        import socket

        node_id = node_ip = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
                node_ip = ray.util.get_node_ip_address()
        except Exception:  # not in a Ray process
            pass
        return {"rank": self.rank, "experts": self.placement.experts_of(self.rank), "node_id": node_id,
                "node_ip": node_ip,
                "pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device),
                "routed_expert_bytes": self.routed_expert_bytes(), "kv_cache_bytes": self.cache.nbytes,
                "kv_pages": self.cache.num_pages,
                "native_experts": self.native_experts, "native_rms_norm": self.native_rms_norm,
                "native_attention_prologue": self.native_attention_prologue,
                "native_decode_layers": self.native_decode_layers,
                "native_decode_stack": self.model.decode_stack is not None,
                "native_paged_attention": self.native_paged_attention, "fp8_experts": self.fp8_experts,
                "cuda_graphs": self.graphs is not None and self.graphs.failed is None,
                "cuda_graphs_off": self.graphs_off if self.graphs is None else self.graphs.failed,
                "collectives": self.collectives, "start_seconds": dict(self.start_seconds)}

    # ---- one lockstep step ---------------------------------------------------------------
    # inference_mode, not no_grad: measured, a 1-sequence mini decode step 6-10% faster (less
    # dispatcher bookkeeping per op). Tensors made here are only ever used inside steps.
    @torch.inference_mode()
    def step(self, plan: RankPlan) -> RankResult:
        t0 = time.perf_counter()
        if self._stall_in is not None:
            left, seconds = self._stall_in
            self._stall_in = (left - 1, seconds) if left else None
            if not left:
                time.sleep(seconds)
        if self._fail_in is not None:
            left, message = self._fail_in
            self._fail_in = (left - 1, message) if left else None
            if not left:
                raise RuntimeError(message)
        for seq_id in plan.release:
            self.params.pop(seq_id, None)
        for w in plan.work:
            if w.params is not None:
                self.params[w.seq_id] = w.params
        starts, lengths = [w.start for w in plan.work], [len(w.token_ids) for w in plan.work]
        groups = range(self.cache.layout.num_groups)
        first, pages = [[w.first[g] for w in plan.work] for g in groups], [[w.pages[g] for w in plan.work] for g in groups]
        ids = torch.tensor([t for w in plan.work for t in w.token_ids], dtype=torch.long, device=self.device)
        embeds = self._embed(ids, plan)
        self.dispatcher.begin_step(plan.max_rank_tokens * self.config.text.num_experts_per_tok or None)
        routed: list[torch.Tensor] = []
        self._phase.clear()
        logits = self.graphs.run(embeds, starts, lengths, first, pages, routed) if self.graphs is not None else None
        if logits is None:   # no graphs, or a step they do not take
            kv = KVView(self.cache.layout, starts, lengths, first, pages, self.device)
            batch = ForwardBatch.build(starts, lengths, device=self.device, kv=kv)
            logits = self.model(batch=batch, cache=self.cache, inputs_embeds=embeds, routed_ids=routed)
        counts, by_class = self.tally.count(routed, ids)
        # A prefill chunk that is not its prompt's last samples nothing.
        sampled = [i for i, w in enumerate(plan.work) if w.sample]
        if len(sampled) < len(plan.work):
            plan, logits = dataclasses.replace(plan, work=[plan.work[i] for i in sampled]), logits[sampled]
        tokens = self._sample(plan, logits)
        st = self.dispatcher.stats
        received = [st.received_per_layer.get(layer, 0) for layer in self._moe_layers]
        return RankResult(rank=self.rank, tokens=tokens, routed_counts=counts, class_counts=by_class,
                          received=received, a2a_seconds=st.seconds, a2a_bytes=st.bytes_sent,
                          step_seconds=time.perf_counter() - t0, phase_seconds=dict(self._phase),
                          num_tokens=int(ids.numel()), logprobs=self._last_logprobs)

    _sampler = None          # RankSampler, made on the first _sample (engine/rank_sampler.py)
    _last_logprobs: dict = {}  # the last _sample's logprobs, for its RankResult

    def _sample(self, plan: RankPlan, logits: torch.Tensor) -> dict[str, int]:
        """(B, V) logits -> the next token of each sequence (engine/rank_sampler.py): greedy rows
        take one batched argmax, the others draw one by one, each draw seeded from (request seed,
        token position), so a sequence replayed on new ranks after a failure draws exactly what it
        would have drawn. Penalties, bias, min_tokens and grammar masks read the per-sequence
        state the sampler keeps (dropped once a sequence's params are released). The sequences'
        logprobs, where asked, are left in _last_logprobs for the step's RankResult."""
        if self._sampler is None:
            from .rank_sampler import RankSampler

            text = self.config.text
            self._sampler = RankSampler(self.checkpoint, text.vocab_size, text.eos_token_ids)
        tokens, self._last_logprobs = self._sampler.sample(plan.work, logits, self.params)
        return tokens

    def _embed(self, ids: torch.Tensor, plan: RankPlan) -> torch.Tensor:
        """(T,) ids -> (T, C) embeddings, with image features fused at patch positions (vision path)."""
        embeds = self.model.embed(ids)
        if any(w.mm_inputs is not None for w in plan.work):
            from .multimodal import fuse_images  # vision path; only imported when images arrive

            embeds = fuse_images(self, embeds, ids, plan)
        return embeds

    # ---- test hooks / profiling -----------------------------------------------------------
    def stall_after(self, steps: int, seconds: float) -> None:
        """Test hook: this rank sleeps `seconds` in its step after `steps` more steps (a hung rank)."""
        self._stall_in = (steps, seconds)

    def fail_after(self, steps: int, message: str) -> None:
        """Test hook: this rank raises RuntimeError(message) in its step after `steps` more steps."""
        self._fail_in = (steps, message)

    def force_expert(self, expert: int | None) -> None:
        """Test hook: route every token to one expert (None restores the router)."""
        for block in self.model.moe_blocks:
            block.force_expert = expert

    def skew_routing(self, bias: list[float] | None) -> None:
        """Test hook: adds `bias` (E,) to every MoE layer's router logits (None restores it)."""
        for block in self.model.moe_blocks:
            block.route_bias = None if bias is None else torch.tensor(bias, dtype=torch.float32)

    def enable_phase_timing(self) -> None:
        """Times attention, routed experts, shared expert and dense MLP per step, into each
        result's phase_seconds (benchmarks; the module hooks cost ~0.2-0.3 ms per `mini` step).
        The router is one matmul inside the MoE block (fused.project), not a module call, so it
        is not timed apart. Decoder layers that run a decode step in one native call are timed
        as one phase, "decode_layer". Idempotent; disable_phase_timing removes them."""
        if self._profile_hooks:
            return

        def hooks(name):
            def pre(module, args):
                module._t0 = time.perf_counter()

            def post(module, args, out):
                self._phase[name] += time.perf_counter() - module._t0
            return pre, post

        for layer in self.model.model.layers:
            targets = [("attention", layer.self_attn)]
            if layer.is_moe:
                ff = layer.feed_forward
                targets += [("experts", ff.experts), ("shared_expert", ff.shared_expert)]
            else:
                targets.append(("dense_mlp", layer.feed_forward))
            for name, mod in targets:
                pre, post = hooks(name)
                self._profile_hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
            if layer.decode_kernel is not None:
                layer.decode_kernel.phase = self._phase
        if self.model.decode_stack is not None:
            self.model.decode_stack.phase = self._phase

    def disable_phase_timing(self) -> None:
        """Removes the hooks of enable_phase_timing; results carry no phase_seconds again."""
        for handle in self._profile_hooks:
            handle.remove()
        self._profile_hooks = []
        for layer in self.model.model.layers:
            if layer.decode_kernel is not None:
                layer.decode_kernel.phase = None
        if self.model.decode_stack is not None:
            self.model.decode_stack.phase = None
