"""Incremental detokenization: the text of a growing list of token ids, with O(1) decode work per
token (amortized) and no U+FFFD sent for a character whose bytes are still arriving.

As vLLM's incremental detokenizer and HF's `DecodeStream` do, only a small window of the ids is
decoded per token: `ids[start:]`, where `start` trails the end by a few tokens of context (so
decoders that treat the first token specially, like SentencePiece's leading space, decode the
new tokens as they do inside the whole text). `sent` counts the window text's characters already
returned.

UTF-8 across tokens. A byte-level BPE token may hold part of a character; decoding the ids up to
it shows that part as U+FFFD. So the window text's trailing run of U+FFFD (at most
`MAX_PENDING_FFFD` of them: a character has at most 3 bytes before its last) is held back until
a later token completes it or `flush` at the end returns it: a replacement character is sent
only where the final text has one.

The window moves forward (`_compact`) only where that cannot change the text: the window text
ends with a whole character (no U+FFFD) and the text of the new, shorter window is a suffix of
the old one (of the few cut points tried, one falls between characters). In output that stays invalid UTF-8 for many tokens in a row the window grows until
a whole character arrives (as vLLM's does).

Exact (streamed concatenation == decode of all ids) for decoders whose output for a prefix of the
ids is a prefix of the output for all of them: byte-level BPE (Llama 3 / 4 and the tiny
checkpoints), SentencePiece with byte fallback. Not for `clean_up_tokenization_spaces`, which can
rewrite text across the boundary (" ." -> "."); Llama 4's tokenizer does not set it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT = 6            # tokens kept before the unsent text when the window moves
WINDOW_LIMIT = 16      # the window moves once it holds this many tokens (and can move)
MAX_PENDING_FFFD = 4   # trailing U+FFFD held back: enough for any partial character


def pending_tail(text: str) -> int:
    """Characters at the end of `text` that may still change as more tokens arrive: its trailing
    U+FFFD, at most MAX_PENDING_FFFD of them."""
    n = 0
    while n < MAX_PENDING_FFFD and n < len(text) and text[-1 - n] == REPLACEMENT:
        n += 1
    return n


class IncrementalDetokenizer:
    """`step(ids)` after each new id returns the new text; `flush(ids)` at the end returns what was
    held back. `ids` is the whole output so far (the same list, grown by appends); only its last
    few entries are decoded. `decode(ids) -> str` is the tokenizer's (special tokens skipped,
    or not, as the caller's decode does)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.start = 0   # first id of the decoded window
        self.sent = 0    # characters of decode(ids[start:]) already returned

    def step(self, ids: Sequence[int]) -> str:
        text = self._decode(ids[self.start:])
        stable = len(text) - pending_tail(text)
        out = text[self.sent:stable] if stable > self.sent else ""
        self.sent = max(self.sent, stable)
        if len(ids) - self.start >= WINDOW_LIMIT:
            self._compact(ids, text)
        return out

    def flush(self, ids: Sequence[int]) -> str:
        """The text not yet returned (held-back U+FFFD included: the output ends here)."""
        text = self._decode(ids[self.start:])
        out = text[self.sent:]
        self.sent = len(text)
        return out

    def _compact(self, ids: Sequence[int], text: str) -> None:
        if text.endswith(REPLACEMENT):
            return  # a character may be incomplete: moving the window could split it
        unsent = len(text) - self.sent
        for start in range(len(ids) - CONTEXT, len(ids) - CONTEXT - MAX_PENDING_FFFD, -1):
            tail = self._decode(ids[start:])  # a cut inside a character shows as a U+FFFD here
            if len(tail) >= unsent and text.endswith(tail):
                self.start, self.sent = start, len(tail) - unsent
                return
