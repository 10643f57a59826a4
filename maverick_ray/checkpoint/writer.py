"""Writes deterministic random Llama 4 checkpoints in the Hugging Face layout.

Output: config.json (Llama4Config form), generation_config.json, tokenizer files, and
safetensors under the on-disk names (`language_model.` prefix), sharded with an index above
`max_shard_bytes`. transformers' Llama4ForConditionalGeneration and AutoTokenizer load it.
With fp8=True the routed experts are written split and FP8 through compressed-tensors, as in
the official FP8 release (fp8_writer.py), and config.json gets its quantization_config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from ..config import ModelConfig
from .names import TEXT_PREFIX, expected_text_tensors, expected_vision_tensors, is_routed_expert, split_expert_names
from .presets import PRESETS
from .tokenizer_build import build_tokenizer, write_tokenizer

log = logging.getLogger(__name__)


def config_dict(text: dict, vision: dict | None, vocab: int, ids: dict[str, int]) -> dict:
    """config.json (Llama4Config form) for text and vision fields (presets.py's form), a vocab
    size and the special tokens' ids."""
    stops = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    text_cfg = dict(text, model_type="llama4_text", vocab_size=vocab, bos_token_id=ids["<|begin_of_text|>"],
                    eos_token_id=stops, pad_token_id=ids["<|finetune_right_pad|>"], hidden_act="silu",
                    tie_word_embeddings=False, attention_bias=False)
    cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
           "text_config": text_cfg, "boi_token_index": ids["<|image_start|>"],
           "eoi_token_index": ids["<|image_end|>"], "image_token_index": ids["<|patch|>"],
           "tie_word_embeddings": False, "torch_dtype": "float32"}
    if vision is not None:
        cfg["vision_config"] = dict(vision, model_type="llama4_vision_model")
    return cfg


def _init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic per-tensor values, spread wide enough that greedy decoding has clear winners."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith(("norm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias") or len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=g)
    fan_in = shape[-2] if is_routed_expert(name) else shape[-1]
    scale = {"router": 4.0, "lm_head": 3.0}.get(next((k for k in ("router", "lm_head") if k in name), ""), 1.0)
    return torch.randn(shape, generator=g) * (scale / fan_in ** 0.5)


def _tensors(cfg: ModelConfig, seed: int, dtype: torch.dtype, experts_layout: str) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor."""
    out = {}
    for name, shape in expected_text_tensors(cfg.text).items():
        t = _init(name, shape, seed).to(dtype)
        if is_routed_expert(name) and experts_layout == "split":
            for e in range(shape[0]):
                split = split_expert_names(TEXT_PREFIX + name, e)
                if name.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2, dim=-1)  # (C, I) each
                    out[split["gate_proj"]] = gate.T.contiguous()
                    out[split["up_proj"]] = up.T.contiguous()
                else:
                    out[split["down_proj"]] = t[e].T.contiguous()
            continue
        out[TEXT_PREFIX + name] = t
    for name, shape in expected_vision_tensors(cfg).items():
        out[name] = _init(name, shape, seed).to(dtype)
    return out


def _save_shards(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, max_shard_bytes: int = 2 * 2**30,
                     progress: bool = True, dtype: torch.dtype = torch.float32,
                     experts_layout: str = "fused", fp8: bool = False) -> Path:
    """Writes a checkpoint of the named preset into `out` (created); returns the path.
    fp8: routed experts FP8 (compressed-tensors FP8_DYNAMIC), always split; the rest in `dtype`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if experts_layout not in ("fused", "split"):
        raise ValueError("experts_layout must be 'fused' or 'split'")
    if fp8:
        experts_layout = "split"   # compressed-tensors quantizes Linear modules: one per expert
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = build_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg_dict = config_dict(*PRESETS[preset], vocab, ids)
    cfg = ModelConfig.from_dict(cfg_dict)
    if progress:
        print(f"writing {preset} checkpoint to {out} ...", flush=True)
    tensors = _tensors(cfg, seed, dtype, experts_layout)
    compressor = None
    if fp8:
        from .fp8_writer import quantize_experts_fp8

        tensors, compressor = quantize_experts_fp8(tensors)
    save_checkpoint(out, cfg_dict, tensors, tok, ids, max_shard_bytes)
    if compressor is not None:
        compressor.update_config(str(out))   # adds quantization_config
    return out


def save_checkpoint(out: Path, cfg_dict: dict, tensors: dict[str, torch.Tensor], tok, ids: dict[str, int],
                    max_shard_bytes: int = 2 * 2**30) -> None:
    """Writes on-disk-named tensors, config.json, generation_config.json, the tokenizer files (with
    the chat template) and, with a vision tower, the processor configs into the directory `out`.
    Used for the random checkpoints here and for the trained demo model (maverick_ray/train)."""
    _save_shards(out, tensors, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    t = cfg_dict["text_config"]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": t["bos_token_id"], "eos_token_id": t["eos_token_id"], "pad_token_id": t["pad_token_id"]},
        indent=2))
    write_tokenizer(out, tok, ids)
    cfg = ModelConfig.from_dict(cfg_dict)
    if cfg.vision is not None:
        _write_processor_configs(out, cfg)


def _write_processor_configs(out: Path, cfg: ModelConfig, max_tiles: int = 16) -> None:
    """Image-processor and processor configs in transformers' Llama 4 form (tile = vision image_size)."""
    v = cfg.vision
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
        "size": {"height": v.image_size, "width": v.image_size}, "max_patches": max_tiles,
        "resize_to_max_canvas": False, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True, "resample": 2}, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "Llama4Processor", "patch_size": v.patch_size,
        "pixel_shuffle_ratio": v.pixel_shuffle_ratio, "fake_image_token": "<|image|>", "image_token": "<|image|>",
        "start_of_image_token": "<|image_start|>", "end_of_image_token": "<|image_end|>",
        "patch_token": "<|patch|>", "tile_x_separator_token": "<|tile_x_separator|>",
        "tile_y_separator_token": "<|tile_y_separator|>"}, indent=2))


# Bumped whenever what the tiny checkpoint holds changes, so a cached one from an older version
# is not reused (2: it carries the project's Llama 4 chat template).
TINY_VERSION = 2


def default_checkpoint_dir() -> Path:
    """Where the tiny checkpoint lives: tiny-v<TINY_VERSION> under $MAVERICK_RAY_CACHE, else
    $XDG_CACHE_HOME/maverick-ray, else ~/.cache/maverick-ray."""
    from ..cache_dir import cache_root

    return cache_root() / f"tiny-v{TINY_VERSION}"


def ensure_tiny_checkpoint(path: str | Path | None = None) -> Path:
    """Returns the tiny checkpoint's directory, writing it first if missing (atomically)."""
    target = Path(path) if path else default_checkpoint_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_checkpoint(tmp, "tiny", progress=False)
        try:
            os.rename(tmp, target)  # atomic; loses the race gracefully if another process won
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
