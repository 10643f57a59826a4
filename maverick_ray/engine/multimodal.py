"""Image inputs on the engine: vision features fused into the prompt embeddings on the rank.

Shape legend: T tokens of a step, C text hidden, n tiles of one request, K tokens per tile.
The vision tower is built on a rank only when the first image arrives: text-only traffic
never loads or runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def patch_count(prompt_ids: list[int], image_token_id: int) -> int:
    return sum(1 for t in prompt_ids if t == image_token_id)


def check_mm_inputs(prompt_ids: list[int], mm_inputs, model_config) -> None:
    """Raises InvalidRequest unless the prompt's patch tokens match the tiles' features."""
    from .sampling import InvalidRequest

    if model_config.vision is None:
        raise InvalidRequest("this model has no vision tower; image inputs are not supported", "messages")
    pixels = mm_inputs.get("pixel_values") if isinstance(mm_inputs, dict) else None
    v = model_config.vision
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (
            v.num_channels, v.image_size, v.image_size):
        raise InvalidRequest(f"pixel_values must be (tiles, {v.num_channels}, {v.image_size}, {v.image_size})",
                             "messages")
    want, have = pixels.shape[0] * v.tokens_per_tile, patch_count(prompt_ids, model_config.image_token_id)
    if want != have:
        raise InvalidRequest(f"the prompt has {have} image patch tokens but the images give {want} features",
                             "messages")


def _vision(worker):
    if worker.vision is None:
        from ..checkpoint.loader import load_state_dict
        from ..model.vision import VisionModel

        model = VisionModel(worker.config)
        model.load_state_dict(load_state_dict(worker.checkpoint, worker.config, include_text=False,
                                              dtype=worker.dtype, progress=False))
        worker.vision = model.to(worker.device).eval()
    return worker.vision


def fuse_images(worker, embeds: torch.Tensor, ids: torch.Tensor, plan) -> torch.Tensor:
    """embeds (T, C): image features replace the embeddings at patch-token positions, in order."""
    image_id = worker.config.image_token_id
    offset = 0
    for w in plan.work:
        n = len(w.token_ids)
        pos = (ids[offset:offset + n] == image_id).nonzero().squeeze(1) + offset if w.mm_inputs is not None else None
        if pos is not None and pos.numel():
            # the patch tokens of this step are features mm_offset.. (those before came from the prefix cache)
            pixels = w.mm_inputs["pixel_values"].to(worker.device, worker.dtype)
            feats = _vision(worker)(pixels).to(embeds.dtype)[w.mm_offset:]  # (n_tiles*K - mm_offset, C)
            if pos.numel() != feats.shape[0]:
                raise ValueError(f"{w.seq_id}: {pos.numel()} patch tokens for {feats.shape[0]} image features")
            embeds = embeds.index_copy(0, pos, feats)
        offset += n
    return embeds


def read_image_files(paths: list[str]) -> list[bytes]:
    """CLI: the image files' bytes (no decoding yet), with an ImageError naming an unreadable one."""
    data = []
    for p in paths:
        try:
            data.append(Path(p).read_bytes())
        except OSError as e:
            from ..multimodal.images import ImageError

            raise ImageError(f"image {len(data)}: cannot read {p} ({e.strerror})") from None
    return data


def prompt_with_images(ckpt: Path, tokenizer, images: list[bytes], text: str, max_images: int):
    """CLI: image bytes + text -> (prompt ids, mm inputs); images come before the text. Decodes
    and resizes with torch: run it through Engine.submit_preprocessing."""
    from ..config import ModelConfig
    from ..multimodal.prompt import chat_prompt_with_images

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return chat_prompt_with_images([{"role": "user", "content": content}], tokenizer,
                                   ModelConfig.from_pretrained(ckpt), ckpt, max_images=max_images, images=images)


def prepare_images_from_files(ckpt: Path, tokenizer, paths: list[str], text: str, max_images: int):
    """image files + text -> (prompt ids, mm inputs) on the calling thread (tests, scripts)."""
    return prompt_with_images(ckpt, tokenizer, read_image_files(paths), text, max_images)
