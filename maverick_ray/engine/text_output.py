"""A request's output text as it streams: incremental detokenization (engine/detokenizer.py) plus
stop strings, with the text that could still become a stop string held back.

`TextOutput(decode, stops)`: after each generated token, `add(output_ids)` returns (text to send,
stopped); when the request ends for another reason (EOS, a stop token id, max_tokens),
`tail(output_ids)` returns everything held back. The stop string itself is never sent (OpenAI
semantics). Work per token is O(1) in the output length: the detokenizer decodes a small window,
and only the held-back text (shorter than the longest stop string) plus the new text is searched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .detokenizer import IncrementalDetokenizer


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still grow into a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class StopStrings:
    """Text in, text out: cuts at the first stop string and holds back a suffix that could start one.

    The held-back suffix can never contain a whole stop string, and no stop string can begin
    before it (else that partial stop would be a longer held-back suffix), so searching only the
    held-back text plus the new text finds the earliest stop in the whole output."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, active: bool = True) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the output). Inactive (the request
        has not reached its min_tokens yet, as in vLLM), the text goes out whole, unsearched."""
        if not active:
            out, self.pending = self.pending + text, ""
            return out, False
        if not self.stops:
            return text, False
        text = self.pending + text
        idx = find_stop(text, self.stops)
        if idx is not None:
            self.pending = ""
            return text[:idx], True
        keep = held_back(text, self.stops)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextOutput:
    """One request's streamed text: `add` after each token, `tail` when it ends without a stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: list[str]):
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stop_strings = StopStrings(stops)

    def add(self, output_ids: Sequence[int], stops_active: bool = True) -> tuple[str, bool]:
        """The text the newest id adds that is safe to send, and whether a stop string matched.
        stops_active False: the output is still short of min_tokens, so stop strings do not end it."""
        return self.stop_strings.feed(self.detokenizer.step(output_ids), stops_active)

    def tail(self, output_ids: Sequence[int]) -> str:
        """Everything held back (a partial character, a partial stop string), for the final event;
        cut at a stop string should the held-back characters complete one."""
        text, stopped = self.stop_strings.feed(self.detokenizer.flush(output_ids))
        return text if stopped else text + self.stop_strings.flush()
