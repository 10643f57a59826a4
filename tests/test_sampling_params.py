"""Sampling parameters through the real engine (EP = 1 in-process, EP = 2 on Ray) against
transformers: logprobs against its log-softmax, and greedy decoding under repetition / presence /
frequency penalties, logit_bias, min_p and min_tokens against its `generate` with the matching
logits processors (presence / frequency written here: transformers has none), in batches that
mix requests with different parameters, and after a rank failure replays the sequences."""

from __future__ import annotations

import threading

import pytest
import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams

MAX_TOKENS = 14


class PresenceFrequencyPenalty:
    """vLLM's / OpenAI's presence and frequency penalties as a transformers logits processor:
    logit -= frequency x count + presence, over the tokens generated so far (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for b in range(scores.shape[0]):
            ids, counts = input_ids[b, self.prompt_len:].unique(return_counts=True)
            scores[b, ids] -= self.frequency * counts.to(scores.dtype) + self.presence
        return scores


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


_HF_GREEDY: dict[tuple, list[int]] = {}


def hf_greedy(hf, prompt: list[int], p: SamplingParams, eos: list[int]) -> list[int]:
    """transformers' greedy continuation under the processors matching `p` (vLLM's order). The
    module's one model: computed once per prompt and parameters (the EP = 1 and EP = 2 tests and
    the replay test check against the same references)."""
    key = (id(hf), tuple(prompt), repr(p), tuple(eos))
    if key not in _HF_GREEDY:
        _HF_GREEDY[key] = _hf_greedy(hf, prompt, p, eos)
    return list(_HF_GREEDY[key])


def _hf_greedy(hf, prompt: list[int], p: SamplingParams, eos: list[int]) -> list[int]:
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                              RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

    procs = []
    if p.min_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, eos))
    if p.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()]))
    if p.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        procs.append(PresenceFrequencyPenalty(len(prompt), p.presence_penalty, p.frequency_penalty))
    if p.min_p:
        procs.append(MinPLogitsWarper(p.min_p))
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=p.max_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList(procs), pad_token_id=0,
                          eos_token_id=None if p.ignore_eos else eos)[0, len(prompt):].tolist()
    if not p.ignore_eos:
        for i, t in enumerate(out):
            if t in eos:
                return out[:i]
    return out


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """(len(output), V) log-softmax of transformers' logits at each generated position."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:len(prompt) - 1 + len(output)]


def cases(ckpt) -> list[tuple[list[int], SamplingParams]]:
    cfg = ModelConfig.from_pretrained(ckpt).text
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(10, cfg.vocab_size - 50, (n,), generator=g).tolist() for n in (9, 23, 14, 31, 6, 12)]
    eos = cfg.eos_token_ids[0]
    base = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [
        (prompts[0], SamplingParams(**base, logprobs=5)),
        (list(range(10, 610, 4)), SamplingParams(**base, repetition_penalty=3.0, logprobs=0)),
        (prompts[2], SamplingParams(**base, presence_penalty=2.0, frequency_penalty=2.0, logprobs=20)),
        (prompts[3], SamplingParams(**base, logit_bias={prompts[3][0]: 4.0, 300: 3.5, 17: -100.0}, min_p=0.2,
                                    repetition_penalty=0.7)),
        (prompts[4], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, min_tokens=4, logit_bias={eos: 60.0},
                                    frequency_penalty=-0.5)),
        (prompts[5], SamplingParams(**base, presence_penalty=-1.0, repetition_penalty=0.3, logit_bias={42: 2.5})),
    ]


def run_mixed(eng: Engine, reqs) -> list[dict]:
    """All requests at once (one batch mixing their parameters); per request its tokens and logprobs."""
    results: list[dict] = [{} for _ in reqs]

    def client(i, prompt, params):
        ids, lps = [], []
        for ev in eng.add_request(prompt, params):
            if ev.token_id is not None:
                ids.append(ev.token_id)
                lps.append(ev.logprobs)
        results[i] = {"ids": ids, "logprobs": lps}

    threads = [threading.Thread(target=client, args=(i, p, s)) for i, (p, s) in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def check_against_transformers(hf, ckpt, reqs, results) -> None:
    eos = ModelConfig.from_pretrained(ckpt).text.eos_token_ids
    plain = {}
    for (prompt, params), got in zip(reqs, results):
        ref = hf_greedy(hf, prompt, params, eos)
        assert got["ids"] == ref, f"{params} differs from transformers"
        if params.logprobs is not None:
            ref_lp = hf_logprobs(hf, prompt, got["ids"])
            for k, (tok, lp) in enumerate(zip(got["ids"], got["logprobs"])):
                assert abs(lp.logprob - float(ref_lp[k, tok])) < 1e-4
                assert len(lp.top) == params.logprobs
                if lp.top:
                    top = torch.topk(ref_lp[k], params.logprobs)
                    assert [t for t, _ in lp.top] == top.indices.tolist()
                    assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist())) < 1e-4
        else:
            assert all(lp is None for lp in got["logprobs"])
        plain[tuple(prompt)] = hf_greedy(hf, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                    ignore_eos=True), eos)
    # The processors changed what greedy decoding picks (so the comparisons above could fail).
    unchanged = [i for i, (prompt, _) in enumerate(reqs) if i and results[i]["ids"] == plain[tuple(prompt)]]
    assert not unchanged, f"cases {unchanged} decode as plain greedy does"
    min_tok = results[4]["ids"]
    assert len(min_tok) == 4, "min_tokens: EOS held back for exactly 4 tokens, then taken"


def test_ep1_mixed_parameters_match_transformers(tiny_ckpt, hf):
    reqs = cases(tiny_ckpt)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=8, max_model_len=256)) as eng:
        results = run_mixed(eng, reqs)
    check_against_transformers(hf, tiny_ckpt, reqs, results)


def test_ep2_mixed_parameters_match_transformers(tiny_ckpt, hf, ray_local):
    reqs = cases(tiny_ckpt)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=2), EngineConfig(max_num_seqs=8, max_model_len=256)) as eng:
        results = run_mixed(eng, reqs)
        assert eng.last_step is not None
    check_against_transformers(hf, tiny_ckpt, reqs, results)


def test_penalties_survive_a_rank_failure_replay(tiny_ckpt, hf):
    """A replay prefills prompt + produced tokens; the rank must still count only the produced
    ones for presence / frequency penalties (SeqWork.history carries the split)."""
    reqs = [cases(tiny_ckpt)[i] for i in (2, 5)]
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1),
                EngineConfig(max_num_seqs=8, max_model_len=256, max_recoveries=3)) as eng:
        eng.ranks.call("fail_after", 6, "injected fault")
        results = run_mixed(eng, reqs)
        assert eng.replayed_sequences >= 1
    eos = ModelConfig.from_pretrained(tiny_ckpt).text.eos_token_ids
    for (prompt, params), got in zip(reqs, results):
        assert got["ids"] == hf_greedy(hf, prompt, params, eos)


def test_seeded_sampling_with_penalties_and_min_p_is_reproducible_and_mixed_batches_agree(tiny_ckpt):
    cfg = ModelConfig.from_pretrained(tiny_ckpt).text
    prompt = list(range(20, 40))
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=11, min_p=0.05, presence_penalty=0.8,
                       repetition_penalty=1.2, logprobs=2, ignore_eos=True)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=8, max_model_len=256)) as eng:
        alone = eng.generate(prompt, p)["token_ids"]
        mixed = run_mixed(eng, [(prompt, p), (prompt[:7], SamplingParams(max_tokens=12, temperature=0)),
                                (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3))])
    assert mixed[0]["ids"] == alone and len(alone) == 12
    assert all(0 <= t < cfg.vocab_size for t in alone)
