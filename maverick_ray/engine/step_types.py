"""What the engine sends each rank per step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams, TokenLogprobs


@dataclass
class SeqWork:
    """One sequence's share of a step on its rank."""

    seq_id: str
    start: int                       # tokens of this sequence already in the KV cache
    token_ids: list[int]             # new tokens: (a chunk of) the prompt at prefill, the last sampled token after
    params: SamplingParams | None = None   # sent with prefill chunks; the rank keeps it
    mm_inputs: Any = None            # image inputs for the prefill (vision path; an image prompt is never chunked)
    first: list[int] = field(default_factory=list)        # per KV layer group: first logical block read
    pages: list[list[int]] = field(default_factory=list)  # per group: pages of blocks first.. (kv_blocks.py)
    sample: bool = True              # False for a prefill chunk that is not the prompt's last
    mm_offset: int = 0               # image patch tokens of the context before `start` (cached prefix)
    # (prompt ids, produced ids) of the whole context, on the sampling prefill step of a sequence
    # whose sampling reads its tokens (penalties, min_tokens, structured output; engine/seq_history.py)
    history: tuple[list[int], list[int]] | None = None


@dataclass
class RankPlan:
    work: list[SeqWork] = field(default_factory=list)
    release: list[str] = field(default_factory=list)  # sequences finished/aborted: drop rank state
    max_rank_tokens: int = 0  # most new tokens any rank runs this step (sizes a padded all-to-all)


@dataclass
class RankResult:
    rank: int
    tokens: dict[str, int]                 # seq_id -> sampled token
    routed_counts: list[list[int]]         # per MoE layer, tokens this rank routed to each expert
    received: list[int]                    # per MoE layer, rows this rank's experts received
    a2a_seconds: float = 0.0
    a2a_bytes: int = 0
    step_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # seq_id -> logprobs, where asked
    class_counts: list[list[int]] = field(default_factory=lambda: [[], []])  # non-zero (layer, class, expert)
    # cells: [flat indices, tokens] (engine/token_classes.py)
