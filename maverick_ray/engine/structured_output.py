"""Structured output: the grammar a sequence's output must follow, as token masks (llguidance).

The serving layer turns `response_format` and forced tool calls into a `GuideSpec` (a grammar in
llguidance's JSON form, from a JSON Schema or Lark); the spec travels in SamplingParams.guide.
On the rank, `GrammarCompiler` builds one `llguidance.LLMatcher` per guided sequence (the
tokenizer is read from the checkpoint once per rank, on the first guided request); before each
draw `Guide.mask` gives the allowed tokens, and every token the sequence holds is fed to
`Guide.advance`. When the grammar is complete only the EOS tokens are allowed, so the engine
stops the sequence as at any EOS.

Why llguidance rather than xgrammar: it installs as one 3 MB wheel with no dependencies
(xgrammar 0.2.8 pulls triton and apache-tvm-ffi into a CPU install), it needs no per-grammar
precompilation over the vocabulary (JSON Schemas arrive per request), and its per-token mask
is computed lazily (benchmarks/bench_sampling_overhead.py measures it here).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# JSON output without free whitespace: random or weak models could otherwise emit whitespace
# forever; separators as json.dumps writes them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled (the request gets a 400)."""


@dataclass(frozen=True)
class GuideSpec:
    """What a guided output must follow. kind: "json_schema" (value: the schema as JSON text),
    "json_object" (any JSON object) or "lark" (value: a Lark grammar)."""

    kind: str
    value: str = ""

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form). Raises GrammarError when it does not compile."""
        return _grammar(self.kind, self.value)

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> "GuideSpec":
        return cls("json_schema", json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)   # requests bring their own schemas: a bounded cache
def _grammar(kind: str, value: str) -> str:
    from llguidance import LLMatcher

    try:
        if kind == "json_object":
            g = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        elif kind == "json_schema":
            g = LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        elif kind == "lark":
            g = LLMatcher.grammar_from_lark(value)
        else:
            raise GrammarError(f"unknown guide kind {kind!r}")
    except ValueError as e:
        raise GrammarError(str(e)) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(g)
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar does not compile")
    return g


class Guide:
    """One sequence's grammar state on its rank."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.consumed = 0            # tokens the matcher has taken
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def advance(self, tokens: list[int]) -> None:
        """Feeds tokens the sequence produced (in order)."""
        if self.matcher.is_stopped():   # complete; only ignore_eos decodes past it, unconstrained
            self.consumed += len(tokens)
            return
        if tokens and not self.matcher.consume_tokens(tokens):
            log.warning("structured output: the grammar rejected a token: %s", self.matcher.get_error())
        self.consumed += len(tokens)

    def rewind(self, keep: int) -> None:
        """Back to the state after the first `keep` consumed tokens (a step that ran again)."""
        if keep < self.consumed and self.matcher.rollback(self.consumed - keep):
            self.consumed = keep

    def allowed(self) -> torch.Tensor | None:
        """(V,) bool of the tokens the grammar allows next, or None when the matcher failed
        (the sequence then samples unconstrained; its error was logged)."""
        if self.matcher.is_error():
            return None
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = torch.from_numpy(_unpack(self._bits))
        return bits[:self.vocab_size]


def _unpack(words: torch.Tensor):
    import numpy as np

    return np.unpackbits(words.numpy().view(np.uint8), bitorder="little").astype(bool)


class GrammarCompiler:
    """Per rank: the checkpoint's tokenizer in llguidance's form (built on first use, ~1 s for
    a real vocabulary) and a cache of compiled grammars."""

    def __init__(self, checkpoint: str | Path, vocab_size: int, eos_ids: list[int]):
        self.checkpoint, self.vocab_size, self.eos_ids = Path(checkpoint), vocab_size, list(eos_ids)
        self._tokenizer = None

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(self.checkpoint))
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=self.eos_ids)
        return self._tokenizer

    def guide(self, spec: GuideSpec) -> Guide:
        from llguidance import LLMatcher

        return Guide(LLMatcher(self._ll_tokenizer(), spec.grammar(), log_level=0), self.vocab_size)
