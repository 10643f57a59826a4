"""Incremental detokenization with stop strings held back until they can no longer match."""

from __future__ import annotations


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still grow into a stop string (or finish a
    multi-byte character, shown by decoders as U+FFFD)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    if text.endswith("\ufffd"):
        keep = max(keep, len(text) - len(text.rstrip("\ufffd")))
    return keep


def find_stop(text: str, stops: list[str], search_from: int = 0) -> int | None:
    """Index of the earliest stop string in text[search_from:], or None."""
    hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    return min(hits) if hits else None


def advance(full_text: str, emitted: int, stops: list[str]) -> tuple[str, int, bool]:
    """Given the whole decoded output, returns (new text to send, new emitted count, stopped).

    When a stop string appears, the text before it is released and `stopped` is True; the stop
    string itself is never sent (OpenAI semantics).
    """
    longest = max((len(s) for s in stops), default=0)
    idx = find_stop(full_text, stops, max(0, emitted - longest + 1)) if stops else None
    if idx is not None:
        return full_text[emitted:idx], max(idx, emitted), True
    safe = len(full_text) - held_back(full_text, stops)
    if safe <= emitted:
        return "", emitted, False
    return full_text[emitted:safe], safe, False
