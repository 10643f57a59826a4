"""Failures are found fast and for real: a step deadline that follows the measured steps, an idle
rank's death found by the heartbeat, and no exception that silently ends the engine loop."""

from __future__ import annotations

import time

import pytest

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.deadline import StepDeadline
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.request import EngineError
from maverick_ray.engine.sampling import SamplingParams

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def test_deadline_follows_recent_steps_and_scales_with_tokens():
    d = StepDeadline(factor=10, floor_s=0.5, ceiling_s=60, window=100, warmup_steps=4)
    assert d.for_step(1) == 60  # nothing measured yet: the ceiling
    for _ in range(99):
        d.record(0.02, 10)  # decode steps: 20 ms for 10 tokens, 2 ms per token
    d.record(0.05, 10)      # one slow step is the p99 of 100
    assert d.for_step(10) == pytest.approx(0.5)          # 10 x max(0.05, 0.005 * 10) = 0.5, the floor
    assert d.for_step(1000) == pytest.approx(50.0)       # a 1000-token prefill: 10 x 0.005 * 1000
    assert d.for_step(100_000) == 60                      # never past the ceiling
    d2 = StepDeadline(factor=10, floor_s=0.1, ceiling_s=60, window=100, warmup_steps=4)
    for _ in range(100):
        d2.record(0.2, 1)
    assert d2.for_step(1) == pytest.approx(2.0)


def test_hung_in_process_rank_is_detected_by_the_measured_deadline_not_the_ceiling(tiny_ckpt):
    """EP = 1: the in-process rank honours the step deadline like Ray ranks do; with a 60 s
    ceiling, a hang after tiny's millisecond steps is found within the 1 s floor."""
    cfg = EngineConfig(max_num_seqs=2, max_model_len=512, step_timeout_s=60, step_deadline_floor_s=1.0,
                       max_recoveries=0)  # fail-stop: this test is about detection (test_recovery replaces)
    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg).start()
    try:
        events = iter(eng.add_request(list(range(10, 20)), LONG))
        for _ in range(20):  # past the deadline's warm-up
            assert next(events).token_id is not None
        eng.ranks.call("stall_after", 0, 8.0)
        t0 = time.monotonic()
        last = list(events)[-1]
        waited = time.monotonic() - t0
        assert last.finish_reason == "error" and "did not finish a step within" in last.error, last.error
        assert waited < 5.0, f"found after {waited:.1f}s; the deadline's floor is 1 s"
        assert not eng.healthy
    finally:
        eng.shutdown()


def test_a_bug_in_the_engine_loop_fails_requests_and_marks_the_engine_unhealthy(tiny_ckpt, monkeypatch):
    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=512)).start()
    try:
        events = iter(eng.add_request(list(range(10, 20)), LONG))
        assert next(events).token_id is not None

        def broken(*args, **kwargs):
            raise KeyError("a planning bug")
        monkeypatch.setattr(eng.scheduler, "plan", broken)
        last = list(events)[-1]
        assert last.finish_reason == "error" and "a planning bug" in last.error
        assert not eng.healthy and not eng._thread.is_alive()
        with pytest.raises(EngineError, match="unhealthy"):
            eng.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()


def test_an_idle_rank_that_dies_is_found_by_the_heartbeat_and_replaced(tiny_ckpt, ray_local):
    import ray

    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=2), EngineConfig(max_num_seqs=2, max_model_len=256)).start()
    try:
        prompt = SamplingParams(max_tokens=3, temperature=0)
        first = eng.generate([5, 6, 7], prompt)["token_ids"]
        time.sleep(1.0)  # the step that releases the finished sequence's slot has run: nothing left to do
        assert eng.healthy and eng.stats()["running"] == 0
        ray.kill(eng.ranks.actors[1])
        t0 = time.monotonic()
        while not eng.stats()["rank_failures"] and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert eng.stats()["rank_failures"] == {"died": 1}, "nobody noticed the idle rank's death"
        assert time.monotonic() - t0 < 5
        while eng.stats()["recoveries"]["ok"] == 0 and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        assert eng.healthy and eng.stats()["recoveries"] == {"ok": 1, "failed": 0}  # replaced before any request
        assert eng.generate([5, 6, 7], prompt)["token_ids"] == first
    finally:
        eng.shutdown()
