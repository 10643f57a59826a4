"""The logits processors that read a sequence's own tokens, and the per-sequence token state
they read, kept on the sequence's rank.

Order (vLLM's): structured-output mask, `min_tokens`, `logit_bias`, `repetition_penalty`, then
`frequency_penalty` and `presence_penalty`. The repetition penalty covers the prompt and the
output; frequency and presence cover the output only. So `SeqTokens` keeps the prompt apart from
the produced tokens: a sequence replayed after a rank failure or a preemption prefills prompt +
produced tokens, and its rank rebuilds the split from `SeqWork.history` (engine/seq_history.py).
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams
from .structured_output import Guide


class SeqTokens:
    """One sequence's tokens on its rank: the prompt's distinct ids (for the repetition
    penalty), the produced tokens with their counts, and its grammar state."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                 guide: Guide | None = None):
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.prompt_distinct = (torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
                                if params.repetition_penalty != 1 else None)
        self.output: list[int] = []
        self.counts: dict[int, int] = {}
        self.guide = guide
        self._extend(list(output_ids))

    def _extend(self, tokens: list[int]) -> None:
        self.output.extend(tokens)
        for t in tokens:
            self.counts[t] = self.counts.get(t, 0) + 1
        if self.guide is not None:
            self.guide.advance(tokens)

    def place(self, start: int, tokens: list[int]) -> None:
        """The step feeds `tokens` at context positions start.. (a decode's input is the token
        sampled last). A step run again after a failure feeds a position already seen: what
        followed it is dropped first, so nothing is counted twice."""
        n = start - self.prompt_len
        if n < 0:                       # positions inside the prompt: known already
            tokens, n = tokens[-n:], 0
        if n < len(self.output):
            for t in self.output[n:]:
                self.counts[t] -= 1
                if not self.counts[t]:
                    del self.counts[t]
            del self.output[n:]
            if self.guide is not None:
                self.guide.rewind(n)
        elif n > len(self.output):
            raise RuntimeError(f"sequence tokens out of order: position {start} after "
                               f"{self.prompt_len + len(self.output)} known tokens")
        self._extend(tokens)


def process(row: torch.Tensor, params: SamplingParams, state: SeqTokens | None,
            stop_ids: list[int]) -> torch.Tensor:
    """Applies the sequence's processors to one (V,) float row in place and returns it.
    `stop_ids`: the model's EOS ids (masked with the request's stop_token_ids before
    min_tokens). When the mask and min_tokens together would leave nothing, min_tokens yields."""
    if state is not None and state.guide is not None:
        allowed = state.guide.allowed()
        if allowed is not None:
            row.masked_fill_(~allowed.to(row.device), float("-inf"))
    if state is not None and len(state.output) < params.min_tokens:
        ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(stop_ids))
        if ids:
            idx = torch.tensor(ids, dtype=torch.long, device=row.device)
            kept = row[idx].clone()
            row[idx] = float("-inf")
            if not torch.isfinite(row).any():   # the grammar allows only a stop token
                row[idx] = kept
    if params.logit_bias:
        idx = torch.tensor(list(params.logit_bias), dtype=torch.long, device=row.device)
        row.index_add_(0, idx, torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=row.device))
    if state is None:
        return row
    p = params.repetition_penalty
    if p != 1:
        seen = state.prompt_distinct
        if state.counts:
            seen = torch.cat([seen, torch.tensor(list(state.counts), dtype=torch.long)]).unique()
        idx = seen.to(row.device)
        vals = row[idx]
        row[idx] = torch.where(vals > 0, vals / p, vals * p)
    if (params.frequency_penalty or params.presence_penalty) and state.counts:
        idx = torch.tensor(list(state.counts), dtype=torch.long, device=row.device)
        counts = torch.tensor(list(state.counts.values()), dtype=row.dtype, device=row.device)
        row[idx] -= params.frequency_penalty * counts + params.presence_penalty
    return row
