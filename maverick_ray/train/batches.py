"""The training mixture: packed batches of prose and code windows and chat conversations.

Shape legend: T tokens of a batch (its sequences back to back), N image tiles of the batch.

Every batch holds `text_windows` windows per text domain (prose, code; each `window` tokens from
a random place in a random training document, `<|begin_of_text|>` first; every token trained)
and chat conversations (1-3 turns, some with a system message, some turns about a picture;
only the answers trained) until `chat_tokens` is reached. Batch `step` is drawn from
random.Random((seed, step)), so any batch can be rebuilt on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .conversations import ChatEncoder, Sequence
from .data_chat import chat_pair
from .data_images import image_example

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are maverick-ray's demo model.")


@dataclass
class Batch:
    ids: torch.Tensor            # (T,)
    targets: torch.Tensor        # (T,) bool: token i is trained, predicted at row i-1
    is_text: torch.Tensor        # (T,) bool: prose or code token
    is_image: torch.Tensor       # (T,) bool: token of a conversation with a picture
    lengths: list[int]           # per sequence
    domains: list[str]           # per sequence
    pixels: torch.Tensor | None  # (N, 3, S, S)


def pack(seqs: list[Sequence]) -> Batch:
    ids, targets, is_text, is_image, tiles = [], [], [], [], []
    for s in seqs:
        ids += s.ids
        targets += [False] + s.targets[1:]   # a sequence's first token has nothing before it
        is_text += [s.domain in ("prose", "code")] * len(s.ids)
        is_image += [s.domain == "image"] * len(s.ids)
        if s.pixels is not None:
            tiles.append(s.pixels)
    return Batch(torch.tensor(ids), torch.tensor(targets), torch.tensor(is_text), torch.tensor(is_image),
                 [len(s.ids) for s in seqs],
                 [s.domain for s in seqs], torch.cat(tiles, 0) if tiles else None)


def text_windows(docs: list[list[int]], n: int, window: int, bos: int, rng: random.Random, domain: str) -> list[Sequence]:
    """n windows of at most `window` tokens, documents drawn by length."""
    weights = [len(d) for d in docs]
    out = []
    for doc in rng.choices(docs, weights=weights, k=n):
        start = rng.randrange(max(1, len(doc) - (window - 1)))
        ids = [bos] + doc[start:start + window - 1]
        out.append(Sequence(ids, [True] * len(ids), domain))
    return out


def held_out_windows(docs: list[list[int]], n: int, window: int, bos: int, domain: str) -> list[Sequence]:
    """Up to n consecutive windows, taken in turn from each held-out document (deterministic)."""
    out, k = [], 0
    while len(out) < n and any(len(d) > k * (window - 1) for d in docs):
        for d in docs:
            piece = d[k * (window - 1):(k + 1) * (window - 1)]
            if len(piece) > 16 and len(out) < n:
                out.append(Sequence([bos] + piece, [True] * (len(piece) + 1), domain))
        k += 1
    return out


def conversation(encoder: ChatEncoder, rng: random.Random, image_share: float) -> Sequence:
    turns, has_image = [], False
    for _ in range(rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]):
        if rng.random() < image_share:
            image, q, a = image_example(rng)
            turns.append((q, a, image))
            has_image = True
        else:
            _, q, a = chat_pair(rng)
            turns.append((q, a, None))
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.25 else None
    return encoder.encode(turns, system, "image" if has_image else "chat")


class Mixture:
    def __init__(self, text_docs: dict[str, list[list[int]]], encoder: ChatEncoder, bos: int, seed: int,
                 window: int = 256, text_windows: int = 1, chat_tokens: int = 1536, image_share: float = 0.35):
        self.text_docs, self.encoder, self.bos, self.seed = text_docs, encoder, bos, seed
        self.window, self.n_text, self.chat_tokens, self.image_share = window, text_windows, chat_tokens, image_share

    def batch(self, step: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        seqs = []
        for domain in sorted(self.text_docs):
            seqs += text_windows(self.text_docs[domain], self.n_text, self.window, self.bos, rng, domain)
        chat = 0
        while chat < self.chat_tokens:
            s = conversation(self.encoder, rng, self.image_share)
            seqs.append(s)
            chat += len(s.ids)
        return pack(seqs)
