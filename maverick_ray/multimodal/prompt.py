"""Image parts of chat messages -> Llama 4 prompt tokens and pixel tiles.

The chat template renders the conversation with one `<|image|>` per image part (as transformers'
Llama4Processor.apply_chat_template does); each is then replaced by its image's layout.
One image with an r x c tile grid becomes (transformers' Llama4Processor layout):
  <|image_start|> [per row: tiles of K <|patch|> joined by <|tile_x_separator|>, then
  <|tile_y_separator|>] (only when r*c > 1) <|image|> K x <|patch|> <|image_end|>
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import torch

from .images import ImageError, decode_image, image_tiles


def image_layout(rows: int, cols: int, per_tile: int) -> str:
    s = "<|image_start|>"
    if rows * cols > 1:
        for _ in range(rows):
            s += "<|tile_x_separator|>".join(["<|patch|>" * per_tile] * cols) + "<|tile_y_separator|>"
    return s + "<|image|>" + "<|patch|>" * per_tile + "<|image_end|>"


def image_bytes(url: str, index: int, allow_remote: bool) -> bytes:
    """Bytes of an image_url: data: URLs always; http(s) only when allowed."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"image {index}: image_url.url must be a non-empty string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        mime = header[5:].split(";")[0]
        if not mime.startswith("image/"):
            raise ImageError(f"image {index}: data URL has media type {mime or '(none)'!r}, not an image")
        if ";base64" not in header:
            raise ImageError(f"image {index}: data URL must be base64-encoded")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"image {index}: data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(f"image {index}: remote image URLs are disabled on this server; send a data: URL")
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (operator opted in)
            return r.read(64 * 2**20)
    raise ImageError(f"image {index}: unsupported image URL scheme (use a data: URL)")


def max_tiles_of(ckpt: Path | None) -> int:
    f = Path(ckpt) / "preprocessor_config.json" if ckpt else None
    if f is not None and f.exists():
        return int(json.loads(f.read_text()).get("max_patches", 16))
    return 16


def chat_prompt_with_images(messages, tokenizer, model_config, ckpt=None, max_images: int = 8,
                            allow_remote: bool = False, max_pixels: int = 16_000_000,
                            images: list[bytes] | None = None, render: dict | None = None):
    """OpenAI-style messages -> (prompt ids, {"pixel_values": (tiles, 3, S, S)}).

    `images` supplies raw bytes directly (CLI); otherwise each image_url part is read.
    `render`: keyword arguments of the tokenizer's `render` (tools, template options).
    Raises ImageError, or ChatTemplateError when the template cannot render the messages.
    """
    if model_config.vision is None:
        raise ImageError("this model has no vision tower; image inputs are not supported")
    if images is None:
        urls = [p.get("image_url") for m in messages if isinstance(m.get("content"), list)
                for p in m["content"] if p.get("type") == "image_url"]
        if len(urls) > max_images:
            raise ImageError(f"{len(urls)} images in the request; at most {max_images} are allowed")
        images = [image_bytes(u.get("url") if isinstance(u, dict) else u, i, allow_remote) for i, u in enumerate(urls)]
    elif len(images) > max_images:
        raise ImageError(f"{len(images)} images given; at most {max_images} are allowed")
    v = model_config.vision
    tiles, layouts = [], []
    for i, data in enumerate(images):
        t, (rows, cols) = image_tiles(decode_image(data, i, max_pixels), v.image_size, max_tiles_of(ckpt))
        tiles.append(t)
        layouts.append(image_layout(rows, cols, v.tokens_per_tile))
    pieces = tokenizer.render(messages, **(render or {})).split("<|image|>")
    if len(pieces) - 1 != len(layouts):
        raise ImageError(f"the prompt has {len(pieces) - 1} image placeholders for {len(layouts)} images")
    text = pieces[0] + "".join(lay + rest for lay, rest in zip(layouts, pieces[1:]))
    return tokenizer.encode(text), {"pixel_values": torch.cat(tiles, 0)}
