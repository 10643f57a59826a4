"""The demo model's tokenizer: byte-level BPE trained on the demo corpus, Llama 4's special tokens.

Reuses `checkpoint/tokenizer_build.py` (the same special tokens, pre-tokenizer and file layout
as the tiny checkpoints, with the project's Llama 4 chat template) on the training documents
plus a sample of the generated chat text, with every digit its own token so numbers are read
and written digit by digit.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..checkpoint.tokenizer_build import build_tokenizer, write_tokenizer
from .architecture import VOCAB_SIZE
from .data_chat import chat_pair
from .data_images import image_example
from .data_text import Document


def corpus_lines(docs: list[Document], seed: int, chat_samples: int = 20_000):
    """Lines of the training documents, then questions and answers of generated chats."""
    for d in docs:
        yield from d.text.splitlines()
    for _ in range(500):  # the chat roles, so each header is a few tokens
        yield from ("system", "user", "assistant")
    rng = random.Random(seed)
    for _ in range(chat_samples):
        _, q, a = chat_pair(rng)
        yield q
        yield a
    for _ in range(chat_samples // 10):
        _, q, a = image_example(rng, size=16)
        yield q
        yield a


def train_tokenizer(docs: list[Document], seed: int, vocab_size: int = VOCAB_SIZE):
    """Returns (tokenizers.Tokenizer, {special name: id}); deterministic for the same inputs."""
    return build_tokenizer(vocab_size, lines=corpus_lines(docs, seed), split_digits=True)


def save_tokenizer_dir(out: Path, tok, ids: dict[str, int]) -> Path:
    """Writes the tokenizer files (chat template included) so ChatTokenizer can load them."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tok, ids)
    return out
