"""The prefill pacer: prompt tokens per step sized from measured step times while sequences
decode (engine/prefill_pacer.py), and through a real engine, paced chunks that change no output."""

from __future__ import annotations

import pytest

from maverick_ray.config import ConfigError, EngineConfig, ParallelConfig
from maverick_ray.engine import prefill_pacer as pp
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.prefill_pacer import PrefillPacer
from maverick_ray.engine.sampling import SamplingParams


def test_nothing_decoding_or_pacing_off_takes_the_whole_budget():
    assert PrefillPacer(4096, 2.0).budget(decoding=False) == 4096
    off = PrefillPacer(4096, 0.0)
    off.record(0.010, decodes=8, prompt_tokens=0)
    off.record(0.500, decodes=8, prompt_tokens=4096)
    assert off.budget(decoding=True) == 4096


def test_unmeasured_costs_take_a_first_chunk_then_the_budget_follows_the_measurements():
    p = PrefillPacer(4096, 2.0)
    assert p.budget(True) == pp.FIRST_TOKENS
    p.record(0.020, decodes=16, prompt_tokens=0)       # a decode-only step: 20 ms
    assert p.budget(True) == pp.FIRST_TOKENS           # per-token cost not known yet
    p.record(0.020 + 128 * 0.0005, decodes=16, prompt_tokens=128)  # 0.5 ms per prompt token
    # (2 - 1) * 20 ms * MARGIN / 0.5 ms
    assert p.budget(True) == int(0.020 * pp.MARGIN / 0.0005) == 32
    three = PrefillPacer(4096, 3.0)
    three.record(0.020, 16, 0)
    three.record(0.020 + 128 * 0.0005, 16, 128)
    assert three.budget(True) == 64                    # twice the room, twice the tokens


def test_a_costlier_context_shrinks_the_chunk_down_to_the_floor_and_a_cheap_one_grows_it_to_the_ceiling():
    p = PrefillPacer(4096, 2.0, min_tokens=16)
    p.record(0.020, 16, 0)
    p.record(0.020 + 32 * 0.0005, 16, 32)
    first = p.budget(True)
    p.record(0.020 + 32 * 0.002, 16, 32)               # deeper into the prompt: 4x the cost per token
    assert p.budget(True) < first
    for _ in range(60):
        p.record(0.020 + 16 * 0.1, 16, 16)             # far over: the pacer still advances the floor a step
        p.record(0.020, 16, 0)                         # (decode-only steps between: no probe due)
    assert p.budget(True) == 16
    assert PrefillPacer(4096, 2.0).min_tokens == pp.MIN_TOKENS == EngineConfig().min_prefill_chunk == 1
    for _ in range(300):
        p.record(0.020 + 16 * 1e-7, 16, 16)            # almost free (a GPU's decode step): the ceiling
        p.record(0.020, 16, 0)
    assert p.budget(True) == 4096


def test_a_lower_floor_lets_the_chunk_shrink_to_what_fits_and_a_floor_below_one_is_refused():
    """min_prefill_chunk 1: deep in a prompt, where even 16 tokens would take the step past the
    target, the chunk keeps shrinking toward what fits (down to one token a step)."""
    for floor in (1, 4):
        p = PrefillPacer(4096, 2.0, min_tokens=floor)
        p.record(0.020, 16, 0)
        for _ in range(60):
            p.record(0.020 + 16 * 0.01, 16, 16)        # 10 ms a prompt token: 2 tokens fit 20 ms * MARGIN
            p.record(0.020, 16, 0)
        assert p.budget(True) == max(floor, int(0.020 * pp.MARGIN / 0.01))
    assert PrefillPacer(8, 2.0, min_tokens=16).min_tokens == 8  # never above the ceiling
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="min_prefill_chunk"):
            EngineConfig(min_prefill_chunk=bad)


def test_one_noisy_step_moves_the_chunk_a_little():
    """A mixed step that happened to run as fast as a decode step (noise) must not double the
    next chunk: each sample moves the per-token estimate by a bounded factor."""
    p = PrefillPacer(4096, 2.0)
    p.record(0.020, 16, 0)
    p.record(0.020 + 32 * 0.0005, 16, 32)
    before = p.budget(True)
    p.record(0.0201, 16, 32)                           # nearly "free" prompt tokens
    assert before < p.budget(True) <= before * 1.15
    p.record(0.020 + 32 * 0.05, 16, 32)                # a stall
    assert p.budget(True) >= before * 0.85


def test_a_stale_decode_figure_comes_down_instead_of_inflating_the_chunks():
    """Decode steps measured slow (a busy host) and then mixed steps faster than that: the
    decode figure falls toward them, so the chunk does not keep growing on 'free' tokens."""
    p = PrefillPacer(4096, 2.0)
    p.record(0.100, 16, 0)
    p.record(0.100 + 32 * 0.0005, 16, 32)
    for _ in range(30):
        p.record(0.030, 16, 32)
    assert p.decode_s < 0.035 and p.budget(True) < 64


def test_nonstop_prefill_gets_a_decode_only_step_to_remeasure():
    p = PrefillPacer(4096, 2.0)
    p.record(0.020, 16, 0)
    for _ in range(pp.PROBE_EVERY):
        assert p.budget(True) > 0
        p.record(0.030, 16, 20)
    assert p.budget(True) == 0                         # this step decodes only
    p.record(0.040, 16, 0)                             # decodes got slower: the estimate moves
    assert p.budget(True) > 0 and p.decode_s > 0.020


def test_a_slowdown_of_one_or_less_is_refused():
    for bad in (1.0, 0.5, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="max_decode_slowdown"):
            EngineConfig(max_decode_slowdown=bad)


def test_paced_chunks_shrink_under_decoding_streams_and_change_no_output(tiny_ckpt):
    """8 streams decode while a 3000-token prompt prefills with a 4096-token ceiling: paced, the
    prompt is split across many steps that each carry decodes; every output equals the run
    with a fixed budget (the whole prompt in one step)."""
    long_prompt = [(7 * i) % 500 + 5 for i in range(3000)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def run(slowdown):
        steps = []
        cfg = EngineConfig(max_num_seqs=16, max_prefill_tokens=4096, max_decode_slowdown=slowdown)
        with Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg) as eng:
            eng.add_step_listener(lambda st: steps.append((st.prefill_tokens, st.decodes)))
            streams = [eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=400, temperature=0,
                                                                        ignore_eos=True)) for i in range(8)]
            for st in streams:  # every stream is decoding before the long prompt arrives
                next(ev for ev in st if ev.token_id is not None)
            long = eng.generate(long_prompt, params)["token_ids"]
            rest = [[ev.token_id for ev in st if ev.token_id is not None] for st in streams]
        return long, rest, steps

    paced, paced_rest, paced_steps = run(2.0)
    fixed, fixed_rest, fixed_steps = run(0.0)
    assert paced == fixed and paced_rest == fixed_rest
    mixed = [n for n, decoding in paced_steps if n and decoding]
    assert len(mixed) > 3 and max(mixed) < 3000, mixed                  # split, each step beside decodes
    assert max(n for n, decoding in fixed_steps if decoding) >= 3000     # fixed: the whole prompt at once
