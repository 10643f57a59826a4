"""Builds the tiny checkpoints' tokenizer: byte-level BPE trained on text shipped with the package.

The corpus and training are deterministic, so every machine writes the same tokenizer.json.
Special tokens carry Llama 4's names at the tiny model's own (small) ids.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
    "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
    "<|tile_y_separator|>", "<|image|>", "<|patch|>", "<|python_start|>", "<|python_end|>",
]

CORPUS = """\
maverick-ray serves mixture-of-experts language models across a cluster. Every token is routed to one
of many experts; the router picks the expert with the largest score, and a shared expert sees every token.
Ray actors hold shards of the experts, spread over the nodes of the cluster, and an all-to-all exchange
moves each token to the actor that owns its expert and brings the result back. Attention runs where the
sequence lives, with its key and value cache on the same rank. The serving layer speaks the OpenAI
protocol: chat completions, completions, streaming with server-sent events, and usage counts.
Operators watch how evenly tokens spread over experts and ranks: balancedness, imbalance, idle experts,
all-to-all latency, time to first token, time per output token, queue length and cache usage.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Although practicality beats
purity. Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity, refuse
the temptation to guess. There should be one-- and preferably only one --obvious way to do it.
Now is better than never. Although never is often better than *right* now. If the implementation is hard
to explain, it's a bad idea. If the implementation is easy to explain, it may be a good idea.
The quick brown fox jumps over the lazy dog. Hello! How are you today? Tell me a story about a dragon,
a wizard and a castle on a hill. Name three experts. You are a helpful assistant. What is in this image?
The image shows a cat, a dog, a red car, a blue sky, green trees and yellow flowers. 0123456789.
"""


def build_tokenizer(vocab_size: int = 640, lines=None, split_digits: bool = False):
    """Returns (tokenizers.Tokenizer, {special name: id}), trained on `lines` (an iterable of
    strings; default: the built-in CORPUS). split_digits: every digit is its own token (the demo
    model's arithmetic reads and writes numbers digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS.splitlines() * 4 if lines is None else lines, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    return tok, ids


def write_tokenizer(out: Path, tok, ids: dict[str, int]) -> None:
    """tokenizer.json, tokenizer_config.json (with the project's own Llama 4 chat template,
    checkpoint/llama4_template.py) and special_tokens_map.json, as transformers saves them."""
    from .llama4_template import LLAMA4_CHAT_TEMPLATE

    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for name, i in ids.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "added_tokens_decoder": added, "chat_template": LLAMA4_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>"}, indent=2))
