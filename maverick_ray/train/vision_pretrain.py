"""Vision pre-training: the vision tower, adapter and projector learn to name a picture's shape,
colour and count before the decoder trains, through linear heads on the mean of a tile's projected
tokens (the heads are thrown away; the checkpoint keeps only Llama 4 tensors).

Shape legend: N pictures (one 64 px tile each), K tokens per tile, C text hidden.

Why: trained only through the decoder's answers, the tower took hundreds of picture steps to
carry colour and never learned shape within the time budget (measured: picture-only training,
300-400 steps, shape at chance). With these heads the tower separates the four shapes in ~100
steps of 32 pictures (seconds); then the decoder only has to learn to read the patch tokens.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .data_images import COLOURS, SHAPES, random_scene, render


def picture_batch(rng: random.Random, n: int, tile: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n new one-tile pictures (N, 3, S, S) and their labels: shape, colour, count - 1."""
    from ..multimodal.images import image_tiles

    tiles, labels = [], {"shape": [], "colour": [], "count": []}
    for _ in range(n):
        scene = random_scene(rng)
        t, _ = image_tiles(render(scene, tile, rng), tile, 1)
        tiles.append(t)
        it = scene.items[0]
        labels["shape"].append(SHAPES.index(it.shape))
        labels["colour"].append(list(COLOURS).index(it.colour))
        labels["count"].append(len(scene.items) - 1)
    return torch.cat(tiles, 0), {k: torch.tensor(v) for k, v in labels.items()}


def pretrain_vision(model, steps: int, lr: float, seed: int, batch: int = 32) -> list[float]:
    """Trains model.vision for `steps` AdamW steps (constant lr) on new pictures; returns the losses."""
    if steps <= 0 or model.vision is None:
        return []
    g = torch.Generator().manual_seed(seed + 1)
    C, K = model.cfg.text.hidden_size, model.cfg.vision.tokens_per_tile
    heads = {k: torch.nn.Linear(C, n) for k, n in (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("count", 4))}
    with torch.no_grad():
        for h in heads.values():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * 0.02)
            h.bias.zero_()
    params = list(model.vision.parameters()) + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"{seed}:vision")
    out = []
    for _ in range(steps):
        pixels, labels = picture_batch(rng, batch, model.cfg.vision.image_size)
        pooled = model.vision(pixels).view(batch, K, C).mean(1)                # (N, C)
        loss = sum(F.cross_entropy(h(pooled), labels[k]) for k, h in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        out.append(round(float(loss.detach()), 4))
    return out
