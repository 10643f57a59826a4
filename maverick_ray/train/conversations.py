"""Chats -> Llama 4 token sequences with a loss mask on the assistant's tokens.

Shape legend: L tokens of one conversation, n image tiles, S tile side, K patch tokens per tile.

The text comes from the checkpoint's own chat template through `ChatTokenizer.render` (the
serving path): the conversation is rendered turn by turn, each assistant answer is appended as
answer + `<|eot|>`, and every piece is encoded on its own, so a prompt's tokens are exactly what
the server sends the model and the answer's tokens are the answer's own encoding. Image parts
become `<|image|>`, expanded into the patch layout (`multimodal/prompt.py: image_layout`) of
the tiles cut by `multimodal/images.py` (the server's preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint.tokenizer import ChatTokenizer
from ..config import ModelConfig
from ..multimodal.images import decode_image, image_tiles
from ..multimodal.prompt import image_layout, max_tiles_of

EOT = "<|eot|>"


@dataclass
class Sequence:
    ids: list[int]                    # (L,)
    targets: list[bool]               # (L,) True where token i is trained (predicted from i-1)
    domain: str                       # "prose", "code", "chat", "image"
    pixels: torch.Tensor | None = None  # (n, 3, S, S)


class ChatEncoder:
    def __init__(self, tokenizer: ChatTokenizer, cfg: ModelConfig, ckpt_dir=None):
        self.tok, self.cfg = tokenizer, cfg
        self.max_tiles = max_tiles_of(ckpt_dir)

    def _expand(self, text: str, layouts: list[str]) -> str:
        pieces = text.split("<|image|>")
        if len(pieces) - 1 != len(layouts):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(layouts)} images")
        return pieces[0] + "".join(lay + rest for lay, rest in zip(layouts, pieces[1:]))

    def encode(self, turns: list[tuple[str, str, bytes | None]], system: str | None = None,
               domain: str = "chat") -> Sequence:
        """turns: (user text, assistant answer, image PNG bytes or None) -> one Sequence whose
        targets are the answers and their `<|eot|>`."""
        messages = [{"role": "system", "content": system}] if system else []
        ids, targets, done, done_expanded, layouts, tiles = [], [], "", "", [], []
        for question, answer, image in turns:
            content = question
            if image is not None:
                t, (rows, cols) = image_tiles(decode_image(image), self.cfg.vision.image_size, self.max_tiles)
                tiles.append(t)
                layouts.append(image_layout(rows, cols, self.cfg.vision.tokens_per_tile))
                content = [{"type": "image"}, {"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            prompt = self.tok.render(messages, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ValueError("the chat template does not render conversations incrementally")
            expanded = self._expand(prompt, layouts)
            ctx = self.tok.encode(expanded[len(done_expanded):])
            ans = self.tok.encode(answer + EOT)
            ids += ctx + ans
            targets += [False] * len(ctx) + [True] * len(ans)
            messages.append({"role": "assistant", "content": answer})
            done, done_expanded = prompt + answer + EOT, expanded + answer + EOT
        pixels = torch.cat(tiles, 0) if tiles else None
        return Sequence(ids, targets, domain, pixels)
