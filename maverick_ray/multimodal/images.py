"""Decode images and cut them into Llama 4 tiles, as transformers' Llama4ImageProcessor does.

Shape legend: S tile size, (r, c) tile grid, n = r*c tiles (+1 global tile when n > 1).
Steps: best canvas of S-multiples (at most max_tiles tiles) -> resize without distortion
(bilinear, antialiased, never upscaling past S unless needed) -> pad right/bottom with 0 ->
rescale 1/255 and normalise mean = std = 0.5 (in bfloat16, like the reference) -> tiles
row-major -> plus the whole image resized to S x S when there is more than one tile.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import torch
import torch.nn.functional as F


class ImageError(ValueError):
    """An image input cannot be used; the message names the image and what is wrong."""


def decode_image(data: bytes, index: int = 0, max_pixels: int = 16_000_000):
    """bytes -> RGB PIL image. PNG, JPEG, WebP, GIF (first frame); alpha composited on white."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"image {index}: is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"image {index}: is not an image in a supported format (PNG, JPEG, WebP, GIF)") from None
    except Exception as e:
        raise ImageError(f"image {index}: cannot be decoded ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image {index}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        img.seek(0)
        img.load()
    except Exception as e:
        raise ImageError(f"image {index}: is truncated or corrupt ({type(e).__name__}: {e})") from None
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


@lru_cache(maxsize=8)
def canvases(max_tiles: int, tile: int) -> torch.Tensor:
    """(K, 2) candidate canvas heights/widths: tile-size multiples of at most max_tiles tiles."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for h in sorted(f for f in range(1, n + 1) if n % f == 0):
            by_ratio.setdefault(h / (n // h), []).append((h, n // h))
    return torch.tensor([(h * tile, w * tile) for v in by_ratio.values() for h, w in v])


def best_canvas(height: int, width: int, options: torch.Tensor) -> tuple[int, int]:
    scale_w = options[:, 1] / width
    scale_h = options[:, 0] / height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = torch.min(up) if len(up) else torch.max(scales[scales < 1])
    fits = options[scales == chosen]
    best = fits[torch.argmin(fits[:, 0] * fits[:, 1])] if len(fits) > 1 else fits[0]
    return int(best[0]), int(best[1])


def _fit(height: int, width: int, th: int, tw: int) -> tuple[int, int]:
    sw, sh = tw / width, th / height
    if sw < sh:
        return max(min(math.floor(height * sw), th), 1), tw
    return th, max(min(math.floor(width * sh), tw), 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8, bilinear with antialiasing.

    Interpolates the uint8 pixels directly (torch's native uint8 kernel, as torchvision does for
    transformers' processor) rather than in float: the two round differently by a level or two."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.bfloat16) * (1 / 255)
    return ((y - 0.5) / 0.5).float()


def image_tiles(img, tile: int, max_tiles: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB PIL image -> (tiles (n[+1], 3, S, S) float32, (rows, cols))."""
    import numpy as np

    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    H, W = x.shape[-2:]
    th, tw = best_canvas(H, W, canvases(max_tiles, tile))
    limit_h, limit_w = min(max(H, tile), th), min(max(W, tile), tw)
    resized = _resize(x, _fit(H, W, limit_h, limit_w))
    canvas = torch.zeros(3, th, tw, dtype=torch.uint8)
    canvas[:, :resized.shape[1], :resized.shape[2]] = resized
    rows, cols = th // tile, tw // tile
    norm = _normalize(canvas)
    tiles = norm.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        tiles = torch.cat([tiles, _normalize(_resize(x, (tile, tile)))[None]], 0)
    return tiles, (rows, cols)
