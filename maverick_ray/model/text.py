"""Llama 4 text decoder: embeddings, interleaved dense/MoE layers, final norm, lm_head.

Shape legend: T new tokens (all sequences of a ForwardBatch flattened), B sequences,
C hidden, V vocab. Parameter names equal the HF checkpoint names without the
`language_model.` prefix, so a state dict from maverick_ray.checkpoint loads directly.

    h   = x + attn(rmsnorm(x))
    out = h + ffn(rmsnorm(h))        ffn = dense MLP or MoE block, per layer
(each residual is added inside the block's output projection: one addmm at inference)
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..config import TextConfig
from .attention import Attention
from .batch import ForwardBatch
from .fused import project
from .kv_cache import PagedKVCache
from .moe import MLP, Dispatcher, MoEBlock
from .norm import RMSNorm
from .rope import inverse_frequencies


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, num_local_experts: int | None, dispatcher: Dispatcher | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe[layer]
        if self.is_moe:
            self.feed_forward = MoEBlock(cfg, layer, num_local_experts, dispatcher)
        else:
            self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.decode_kernel = None  # native/decode_layer.py BoundDecodeLayer, see use_decode_kernel

    def use_decode_kernel(self, kernel) -> bool:
        """Runs this layer of fp32 CPU decode steps through `kernel` (a DecodeLayerKernel: one
        native call instead of ~25 dispatched ops and 4 native calls); returns whether the
        layer's layout suits it (None: back to torch)."""
        self.decode_kernel = kernel.bind(self) if kernel is not None else None
        return self.decode_kernel is not None

    def forward(self, x, batch, inv_freq, cache, routed_ids):
        h = self.self_attn(self.input_layernorm(x), batch, inv_freq, cache, residual=x)
        y = self.post_attention_layernorm(h)
        if self.is_moe:
            return self.feed_forward(y, routed_ids, residual=h)
        return self.feed_forward(y, residual=h)


class _Decoder(nn.Module):
    def __init__(self, cfg: TextConfig, num_local_experts: int | None, dispatcher: Dispatcher | None):
        super().__init__()
        # No random init on the meta device (how ranks build the model before loading it): there
        # normal_ runs a Python reference that imports torch._dynamo, ~1.5 s of every rank start.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, num_local_experts, dispatcher) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TextModel(nn.Module):
    """The Llama 4 language model over a ForwardBatch of sequences.

    `expert_ids` names the routed expert in each local slot of this process, in slot order (an
    expert may appear twice; default: all experts, in id order); the dispatcher moves each
    routed row to a process that holds its expert (default: all local).
    """

    def __init__(self, cfg: TextConfig, expert_ids: Iterable[int] | None = None,
                 dispatcher: Dispatcher | None = None):
        super().__init__()
        self.cfg = cfg
        self.expert_ids = list(expert_ids) if expert_ids is not None else list(range(cfg.num_local_experts))
        self.model = _Decoder(cfg, len(self.expert_ids), dispatcher)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.decode_stack = None  # native/decode_layer.py DecodeStack: every layer of a decode step in one call

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.feed_forward for layer in self.model.layers if layer.is_moe]

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        for block in self.moe_blocks:
            block.dispatcher = dispatcher

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, C) embeddings."""
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None = None, batch: ForwardBatch | None = None,
                cache: PagedKVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                all_logits: bool = False, routed_ids: list | None = None) -> torch.Tensor:
        """Runs the new tokens of `batch` and returns logits.

        input_ids (T,) or inputs_embeds (T, C). Without a batch, the tokens are one sequence
        starting at position 0. Returns (T, V) logits when all_logits, else (B, V) for each
        sequence's last new token. routed_ids, when a list, receives each MoE layer's routed
        expert ids (T, k).
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (T, C)
        if batch is None:
            batch = ForwardBatch.single(x.shape[0], device=x.device)
        if x.shape[0] != batch.num_tokens:
            raise ValueError(f"got {x.shape[0]} tokens for a batch of {batch.num_tokens}")
        if cache is not None and batch.kv is None:
            batch.kv = cache.contiguous_view(batch.starts, batch.lengths, x.device, batch.slots)
        native = (cache is not None and cache.attention_kernel is not None and batch.is_decode
                  and x.dtype == torch.float32 and x.is_cpu and not torch.is_grad_enabled())
        stacked = self.decode_stack(x, batch, self.inv_freq, cache, routed_ids) \
            if native and self.decode_stack is not None else None
        if stacked is not None:
            if self.decode_stack.returns_logits:
                return stacked   # a decode step: every row is a last token, all_logits or not
            x = stacked
        else:
            for layer in self.model.layers:
                kernel = layer.decode_kernel
                if native and kernel is not None:
                    x = kernel(x, batch, self.inv_freq, cache, routed_ids)
                else:
                    x = layer(x, batch, self.inv_freq, cache, routed_ids)
        if not all_logits and not batch.is_decode:  # decode: every row already is a last token
            x = x[batch.last_token_index()]  # (B, C)
        return project(self.model.norm(x), self.lm_head)
