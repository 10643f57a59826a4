"""Sampling on a rank: one step's logits -> the next token of each sequence, with logprobs.

`RankSampler.sample` is what `RankWorker._sample` runs. Per sequence it keeps `SeqTokens`
(engine/logits_processors.py) only when its parameters read its tokens (penalties, min_tokens,
structured output), built from `SeqWork.history` at its sampling prefill and advanced with each
decode's input token; the state of a sequence the rank no longer holds parameters for (released)
is dropped at the next step.

Logprobs are those of the model's distribution (log-softmax of the raw logits, before
penalties, bias, masks and temperature: vLLM's default), the sampled token's and the top k.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .logits_processors import SeqTokens, process
from .sampling import SamplingParams, TokenLogprobs, sample_token, token_seed
from .step_types import SeqWork
from .structured_output import GrammarCompiler

log = logging.getLogger(__name__)


class RankSampler:
    def __init__(self, checkpoint: str | Path, vocab_size: int, eos_ids: list[int]):
        self.vocab_size, self.eos_ids = vocab_size, list(eos_ids)
        self.states: dict[str, SeqTokens] = {}
        self.grammars = GrammarCompiler(checkpoint, vocab_size, eos_ids)
        self._generator = torch.Generator()  # reseeded for every sampled token (token_seed)

    def sample(self, work: list[SeqWork], logits: torch.Tensor, params_of: dict[str, SamplingParams]
               ) -> tuple[dict[str, int], dict[str, TokenLogprobs]]:
        """(B, V) logits, one row per work item -> ({seq id: token}, {seq id: logprobs} for the
        sequences that asked). `params_of`: the rank's parameters per live sequence."""
        for seq_id in [s for s in self.states if s not in params_of]:
            del self.states[seq_id]
        params = [params_of[w.seq_id] for w in work]
        states = [self._observe(w, p) for w, p in zip(work, params)]
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_lp = torch.log_softmax(logits[want_lp].float(), dim=-1) if want_lp else None
        processed = [i for i, p in enumerate(params) if p.transforms_logits]
        if processed:
            logits = logits.float().clone()
            for i in processed:
                process(logits[i], params[i], states[i], self.eos_ids)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rows = logits if len(greedy) == len(params) else logits[greedy]  # no index op when all are greedy
        picked = dict(zip(greedy, torch.argmax(rows, dim=-1).tolist())) if greedy else {}
        tokens = {}
        for i, w in enumerate(work):
            if i not in picked:
                self._generator.manual_seed(token_seed(params[i].seed, w.start + len(w.token_ids)))
                picked[i] = sample_token(logits[i], params[i], self._generator)
            tokens[w.seq_id] = picked[i]
        return tokens, self._logprobs(work, params, want_lp, raw_lp, picked)

    def _observe(self, w: SeqWork, params: SamplingParams) -> SeqTokens | None:
        """The sequence's token state after this step's input tokens (None when it keeps none)."""
        if not params.needs_history:
            return None
        if w.history is not None:   # its sampling prefill: new, preempted or replayed
            prompt, output = w.history
            guide = self.grammars.guide(params.guide) if params.guide is not None else None
            state = self.states[w.seq_id] = SeqTokens(params, prompt, output, guide)
            return state
        state = self.states.get(w.seq_id)
        if state is None:   # no history sent: the context so far counts as the prompt
            if w.start:
                log.warning("sequence %s: sampling state built without its history", w.seq_id)
            guide = self.grammars.guide(params.guide) if params.guide is not None else None
            state = SeqTokens(params, [] if w.start else list(w.token_ids), [], guide)
            state.prompt_len = w.start + len(w.token_ids)
            self.states[w.seq_id] = state
            return state
        state.place(w.start, list(w.token_ids))
        return state

    @staticmethod
    def _logprobs(work, params, rows, raw_lp, picked) -> dict[str, TokenLogprobs]:
        if not rows:
            return {}
        k = max(params[i].logprobs for i in rows)
        top_v, top_i = torch.topk(raw_lp, k, dim=-1) if k else (raw_lp[:, :0], raw_lp[:, :0].long())
        idx = torch.tensor([[picked[i]] for i in rows], dtype=torch.long, device=raw_lp.device)
        chosen = raw_lp.gather(1, idx)[:, 0].tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()   # one transfer for the batch
        out = {}
        for j, i in enumerate(rows):
            n = params[i].logprobs
            out[work[i].seq_id] = TokenLogprobs(chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return out
