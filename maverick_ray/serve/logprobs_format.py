"""Token logprobs (engine/sampling.py: TokenLogprobs) in OpenAI's reply shapes.

Chat (`logprobs: true`, `top_logprobs: k`): `choice.logprobs = {"content": [{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}`, one entry per generated
token, streamed with the chunk of that token. Completions (`logprobs: k`): `choice.logprobs =
{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`. A token's text
is its own decoding (special tokens included, a partial UTF-8 character as U+FFFD), as vLLM
returns it; `bytes` are that text's UTF-8 bytes.
"""

from __future__ import annotations

from typing import Callable


class LogprobsFormatter:
    """Formats (token id, TokenLogprobs) pairs; `decode(ids)` is the tokenizer's decode."""

    def __init__(self, decode: Callable[..., str]):
        self._decode = decode
        self._cache: dict[int, str] = {}

    def text(self, token: int) -> str:
        s = self._cache.get(token)
        if s is None:
            s = self._cache[token] = self._decode([token], skip_special_tokens=False)
        return s

    def _entry(self, token: int, logprob: float) -> dict:
        s = self.text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    def chat(self, entries: list[tuple[int, object]]) -> dict:
        """`choice.logprobs` of a chat reply or chunk."""
        content = []
        for token, lp in entries:
            e = self._entry(token, lp.logprob)
            e["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(e)
        return {"content": content}

    def completion(self, entries: list[tuple[int, object]], offset: int = 0) -> dict:
        """`choice.logprobs` of a completion or chunk; `offset`: characters of text before it."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in entries:
            s = self.text(token)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp.logprob)
            top = {}
            for t, v in lp.top:
                top.setdefault(self.text(t), v)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out
