"""Per-request sampling parameters and the token sampler.

Shape legend: V vocab. Sampling runs where the logits are (on the rank that owns the
sequence); each draw is seeded from (request seed, token position) (token_seed), so a seeded
request reproduces its tokens whatever else shares the batch, and after a replay.

What happens to one sequence's logits, in vLLM's order (engine/logits_processors.py applies the
steps that need the sequence's tokens): raw logprobs are read first (`logprobs`); then the
structured-output mask, `min_tokens` (stop tokens masked), `logit_bias`, `repetition_penalty`
(prompt and output tokens), `frequency_penalty` / `presence_penalty` (output tokens); greedy
takes the argmax of that; sampling divides by `temperature`, then applies `min_p`, `top_k`,
`top_p` and draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .structured_output import GuideSpec

MAX_LOGPROBS = 20   # most top logprobs a request may ask for (OpenAI's chat limit)


class InvalidRequest(ValueError):
    """A request parameter is out of range; `param` names it (OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0            # drop tokens whose probability is below min_p x the top one's
    presence_penalty: float = 0.0     # subtracted once from every token already in the output
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    repetition_penalty: float = 1.0   # logits of prompt and output tokens: / p when > 0, x p when < 0
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    min_tokens: int = 0           # stop tokens (EOS unless ignore_eos, stop_token_ids) masked before this many
    logprobs: int | None = None   # None: none; k >= 0: the sampled token's logprob and the top k
    guide: GuideSpec | None = None    # structured output: the grammar the output must follow

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raises InvalidRequest naming the first bad field; `vocab_size` also checks token ids."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        # As vLLM: greedy ignores top_p (and so takes 0); sampling needs top_p in (0, 1].
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1 or (self.top_p == 0 and not self.greedy):
            raise InvalidRequest(f"top_p must be in (0, 1] (0 only with temperature 0), got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be a non-negative integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}", "seed")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop must be a list of non-empty strings", "stop")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {v!r}", name)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                                 "repetition_penalty")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens:
            raise InvalidRequest(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}", "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                 "min_tokens")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                                 "logprobs")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or isinstance(tok, bool) or not _is_number(bias) or not -100 <= bias <= 100:
                raise InvalidRequest("logit_bias maps token ids to numbers in [-100, 100]", "logit_bias")
        if self.guide is not None:
            from .structured_output import GrammarError

            try:
                self.guide.grammar()
            except GrammarError as e:
                raise InvalidRequest(f"the output format cannot be compiled into a grammar: {e}",
                                     "response_format") from None
        if vocab_size is not None:
            for name, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", self.stop_token_ids)):
                bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
                if bad:
                    raise InvalidRequest(f"{name}: token id {bad[0]!r} is out of range [0, {vocab_size})", name)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty reads the sequence's tokens."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens the sequence holds (penalties, min_tokens, a
        grammar): its rank then keeps them (engine/logits_processors.py: SeqTokens)."""
        return self.penalized or self.min_tokens > 0 or self.guide is not None

    @property
    def transforms_logits(self) -> bool:
        """Whether the logits change before the argmax / draw (beyond temperature and top-k/p)."""
        return self.needs_history or bool(self.logit_bias)


@dataclass
class TokenLogprobs:
    """A sampled token's log-probability under the model and the top alternatives, as the rank
    returns them (RankResult.logprobs) and the stream carries them (TokenEvent.logprobs)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), most likely first


def token_seed(seed: int, position: int) -> int:
    """The generator seed for the token at `position` of a request seeded with `seed`: sampling
    depends on (seed, position) only, not on what ran before on the rank, so a replay draws the
    same tokens. The engine gives unseeded sampling requests a random seed at arrival."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits (V,) (already biased, penalized and masked) -> one token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
