"""Helpers for FP8 checkpoint tests: the tiny FP8 checkpoint, copies of it with one thing broken,
and transformers' greedy output on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def write_fp8(path: Path, **kw) -> Path:
    from maverick_ray.checkpoint.writer import write_checkpoint

    return write_checkpoint(path, "tiny", progress=False, fp8=True, **kw)


def broken_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copies a single-file checkpoint; edit_tensors(dict) / edit_config(dict) change it in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@torch.no_grad()
def hf_greedy(ckpt, prompts, max_tokens: int, dequantize: bool) -> list[list[int]]:
    """transformers + compressed-tensors on CPU. dequantize=True: weights dequantized at load, fp32
    activations. dequantize=False (transformers' default): weights decompressed on the first
    forward and each quantized Linear fake-quantizes its input per token (the FP8 run's math)."""
    from transformers import CompressedTensorsConfig, Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=dequantize)).eval()
    outs = []
    for p in prompts:
        gen = model.generate(input_ids=torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


@torch.no_grad()
def hf_logits(ckpt, prompt: list[int], dequantize: bool) -> torch.Tensor:
    """(T, V) logits of one prompt from transformers on the FP8 checkpoint (see hf_greedy)."""
    from transformers import CompressedTensorsConfig, Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=dequantize)).eval()
    return model(input_ids=torch.tensor([prompt])).logits[0]


def fp8_expert_worker(ckpt, engine):
    """A RankWorker (EP 1) that keeps the checkpoint's routed experts FP8 (the fp8_experts knob on:
    model/fp8_experts.Fp8Experts holding the FP8 weights and scales, what an FP8 GPU rank runs)."""
    import dataclasses

    from maverick_ray.config import ModelConfig
    from maverick_ray.engine.worker import RankWorker
    from maverick_ray.parallel.placement import ExpertPlacement

    cfg = ModelConfig.from_pretrained(ckpt)
    w = RankWorker(ckpt, 0, ExpertPlacement.contiguous(cfg.text.num_local_experts, 1),
                   dataclasses.replace(engine, fp8_experts="on"))
    assert w.fp8_experts and w.info()["fp8_experts"]
    return w


@torch.no_grad()
def prefill_logits(model, prompt: list[int], device) -> torch.Tensor:
    """(T, V) fp32 CPU logits of one prompt run from position 0 without a KV cache."""
    return model(torch.tensor(prompt, device=device), all_logits=True).float().cpu()
