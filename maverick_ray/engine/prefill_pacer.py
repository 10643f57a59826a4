"""Sizes each step's prefill chunk from measured step times, so decoding streams stay smooth.

A fixed per-step prompt budget (`max_prefill_tokens`) cannot keep inter-token gaps steady: what
a prefill token costs grows with the context it attends over (a token at position 16k reads 16k
keys in every global layer), and differs by orders of magnitude between a CPU, where a step is
compute-bound, and a GPU, where a decode step is bound by weight reads and extra tokens ride
almost free. So while sequences decode, the pacer lets a step carry as many prompt tokens as fit
in `(max_decode_slowdown - 1)` times a decode-only step, measured online:

    decode_s     EMA of steps that ran decodes and no prompt tokens
    per_token_s  EMA of (mixed step - decode_s) / prompt tokens of that step, each sample kept
                 within [1/SAMPLE_CLAMP, SAMPLE_CLAMP] times the estimate (one noisy step must
                 not halve it and double the next chunk)
    budget       (slowdown - 1) * decode_s * MARGIN / per_token_s, within [min_prefill_chunk, max_prefill_tokens]

The per-token figure tracks the context as a long prompt advances because each mixed step
updates it. Deep into a long prompt a token costs far more than a decode token (on a CPU, a
token at 16k context does ~80 MFLOP of attention alone). A step carrying a prompt sequence also
pays a fixed cost (its cached context read once per layer) that this linear model folds into the
per-token figure. That still converges: each sample is taken at the current chunk size n, so the
chunk settles where fixed + n * marginal fills the target, and only where one token alone overruns
it does the floor `min_prefill_chunk` bind. Short chunks read their pages in place (native kernel),
which keeps that fixed cost small enough for the default floor of 1 to pay off deep in a long
prompt: streams beside a 16k prompt slowed 1.3-1.6x at p99, against 2.2-2.4x with a floor of 16,
while the prompt took 2.5x as long (BENCHMARKS.md).

With no sequence decoding nothing is slowed down, and the step takes the whole
`max_prefill_tokens`. While prompts prefill continuously, every PROBE_EVERY steps one step runs
decodes only, to keep `decode_s` current. This is Sarathi-Serve's stall-free batching with the
token budget derived from measured time rather than profiled offline.
"""

from __future__ import annotations

MIN_TOKENS = 1        # the default floor (min_prefill_chunk): a prompt advances at least this much a step
FIRST_TOKENS = 32     # the chunk while the costs are not measured yet
MARGIN = 0.8          # aim below the target: step times vary, and the next chunk attends further
DECODE_ALPHA = 0.2    # EMA weights
TOKEN_ALPHA = 0.3
SAMPLE_CLAMP = 1.5
PROBE_EVERY = 64      # steps between decode-only measurements while prompts prefill nonstop


class PrefillPacer:
    def __init__(self, max_tokens: int, slowdown: float, min_tokens: int = MIN_TOKENS):
        """max_tokens: the per-step ceiling (max_prefill_tokens); slowdown: how many times a
        decode-only step a step with prompt tokens may take while sequences decode (<= 1: no
        pacing, every step may take max_tokens); min_tokens: the floor (min_prefill_chunk)."""
        self.max_tokens, self.slowdown = max_tokens, slowdown
        self.min_tokens = min(min_tokens, max_tokens)
        self.decode_s: float | None = None
        self.per_token_s: float | None = None
        self._since_decode_only = 0

    @property
    def enabled(self) -> bool:
        return self.slowdown > 1

    def budget(self, decoding: bool) -> int:
        """Prompt tokens a rank may run in the next step; `decoding`: sequences are decoding.
        0 asks for a decode-only step (a measurement)."""
        if not (self.enabled and decoding):
            return self.max_tokens
        if self._since_decode_only >= PROBE_EVERY:
            return 0
        if self.decode_s is None or self.per_token_s is None:
            return min(self.max_tokens, FIRST_TOKENS)
        n = int((self.slowdown - 1) * self.decode_s * MARGIN / max(self.per_token_s, 1e-9))
        return max(min(n, self.max_tokens), self.min_tokens)

    def record(self, seconds: float, decodes: int, prompt_tokens: int) -> None:
        """One step that ran: its wall time, how many sequences decoded in it, and the most prompt
        tokens any rank ran (ranks step in lockstep: the busiest sets the pace)."""
        if not decodes:
            return
        if not prompt_tokens:
            self._since_decode_only = 0
            self.decode_s = seconds if self.decode_s is None else \
                (1 - DECODE_ALPHA) * self.decode_s + DECODE_ALPHA * seconds
            return
        self._since_decode_only += 1
        if self.decode_s is None:
            return
        if seconds <= self.decode_s:  # a step with prompt tokens beat the decode-only figure: that is
            # stale (a busy host calmed down), and this step says nothing of what prompt tokens cost
            self.decode_s = (1 - DECODE_ALPHA) * self.decode_s + DECODE_ALPHA * seconds
            return
        sample = (seconds - self.decode_s) / prompt_tokens  # > 0: slower steps only get here
        if self.per_token_s is None:
            self.per_token_s = max(sample, 1e-9)
            return
        sample = min(max(sample, self.per_token_s / SAMPLE_CLAMP), self.per_token_s * SAMPLE_CLAMP)
        self.per_token_s = (1 - TOKEN_ALPHA) * self.per_token_s + TOKEN_ALPHA * sample
