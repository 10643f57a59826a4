"""Per-request deadlines: the scheduler names the requests past theirs, queued or running, and the
engine ends them with finish_reason "timeout" and frees their KV slot (the real engine, EP = 1).
The HTTP shapes (504, the SSE error event, the `timeout` field's 400s) are in test_http_errors.py."""

from __future__ import annotations

import math
import time

import pytest

from maverick_ray.config import ConfigError, EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.request import Request, RequestState, RequestStream, RequestTimedOut
from maverick_ray.engine.sampling import InvalidRequest, SamplingParams
from maverick_ray.engine.scheduler import Scheduler

PROMPT = list(range(10, 20))


def request(rid: str, timeout_s: float | None, arrival: float) -> Request:
    return Request(rid, list(PROMPT), SamplingParams(max_tokens=4), RequestStream(rid), arrival=arrival,
                   timeout_s=timeout_s)


def test_scheduler_names_expired_requests_whether_queued_or_running():
    sched = Scheduler(1, EngineConfig(max_num_seqs=1))
    running, queued, late, forever = (request("running", 1.0, 100.0), request("queued", 2.0, 100.0),
                                      request("late", 9.0, 100.0), request("forever", None, 100.0))
    for r in (running, queued, late, forever):
        sched.add(r)
    sched.plan()
    assert running.state is RequestState.PREFILLING and queued.state is RequestState.WAITING
    assert sched.expired(100.5) == []
    assert sched.expired(101.0) == [running]                      # the deadline itself counts
    assert {r.request_id for r in sched.expired(102.0)} == {"running", "queued"}
    sched.finish(queued)
    assert sched.expired(1e9) == [late, running]                  # queue first; never `forever`


def test_request_deadline_s_is_validated():
    assert EngineConfig().request_deadline_s == 0  # no deadline unless configured
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="request_deadline_s"):
            EngineConfig(request_deadline_s=bad)


def test_deadline_ends_running_and_queued_requests_and_frees_the_slot(tiny_ckpt):
    cfg = EngineConfig(max_num_seqs=1, max_model_len=128, step_timeout_s=60, request_deadline_s=1.0)
    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=1), cfg).start()
    try:
        for bad in (0, -1, math.nan, "5", True):
            with pytest.raises(InvalidRequest) as e:
                eng.add_request(PROMPT, timeout_s=bad)
            assert e.value.param == "timeout", bad
        # The rank's 2nd step takes 2 s: both deadlines below pass while it runs.
        eng.ranks.call("stall_after", 1, 2.0)
        t0 = time.monotonic()
        running = eng.add_request(PROMPT, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                                  timeout_s=30)  # capped by request_deadline_s: 1 s
        queued = eng.add_request(PROMPT, SamplingParams(max_tokens=4), timeout_s=0.2)  # the one slot is taken
        last = list(running)[-1]
        waited = time.monotonic() - t0
        assert last.finish_reason == "timeout", last
        assert last.error.startswith("the request passed its deadline of 1 s after "), last.error
        assert 1 <= last.completion_tokens < 100
        assert waited < 10, f"ended {waited:.1f} s after arrival; the deadline was 1 s and the slow step 2 s"
        events = list(queued)
        assert len(events) == 1 and events[0].finish_reason == "timeout" and events[0].completion_tokens == 0
        assert events[0].error == "the request passed its deadline of 0.2 s while waiting in the queue"
        stats = eng.stats()
        assert stats["finished"] == {"timeout": 2}
        assert (stats["running"], stats["waiting"], stats["kv_pages_used"]) == (0, 0, 0)
        # The slot is free again: a request with no timeout of its own still gets request_deadline_s,
        # which three tokens on the tiny model do not come near.
        out = eng.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3
        # generate() raises for a request that times out (its prefill step is slowed past 0.2 s).
        eng.ranks.call("stall_after", 0, 0.6)
        with pytest.raises(RequestTimedOut, match="deadline of 0.2 s"):
            eng.generate(PROMPT, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), timeout_s=0.2)
        assert eng.healthy and eng.stats()["kv_pages_used"] == 0
    finally:
        eng.shutdown()
