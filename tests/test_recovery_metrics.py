"""Recovery events without Ray: what Engine._recover tells its recovery listeners, what
EngineMetrics records from them, and the live /dashboard page in headless Chromium while a
recovery is in progress and after it. The rank group is a stand-in whose restart can fail or
wait for the test; the engine, its metrics listener, the HTTP routes and the page are real.
A real kill -9 scraped by a real Prometheus is in test_metrics.py."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.request import EngineError
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.engine.step_channel import RankFailed
from maverick_ray.metrics import EngineMetrics, _Defs
from page_helpers import dashboard_screenshot
from serve_fixtures import app_on_loopback

DIED = RankFailed(1, "ConnectionError", "the step channel closed")


class StandInRanks:
    """What Engine._recover uses of a RankGroup. The first `fail` recoveries raise; with `gate`,
    each recovery waits for it first (`entered` is set once a recovery began); a recovery that
    succeeds replaces rank 0."""

    def __init__(self, fail: int = 0, gate: threading.Event | None = None):
        self.fail, self.gate, self.restarts = fail, gate, 0
        self.entered = threading.Event()
        self.start_seconds = {"release": 0.01, "actor_start": 0.02}
        self.infos: list[dict] = []
        self.kv_pages = 64

    def recover(self, failure: Exception | None, timeout: float) -> list[int]:
        self.restarts += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never released the recovery"
        if self.restarts <= self.fail:
            raise RuntimeError("no room for a rank actor")
        return [0]


def engine(ckpt, ranks: StandInRanks, admitted: int = 0, **cfg) -> Engine:
    """An engine that is not started, over `ranks`, with `admitted` requests admitted to it."""
    eng = Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_model_len=256, **cfg))
    eng.ranks = ranks
    for i in range(admitted):
        eng.add_request([5, 6, 7 + i], SamplingParams(max_tokens=8, temperature=0))
    if admitted:
        eng.scheduler.plan()
    return eng


def listen(eng: Engine) -> list[tuple]:
    events: list[tuple] = []
    eng.add_recovery_listener(lambda *event: events.append(event))
    return events


def test_listeners_hear_the_failure_then_every_restart_and_a_raising_one_is_only_logged(tiny_ckpt, caplog):
    eng = engine(tiny_ckpt, StandInRanks(fail=1), admitted=2)

    def broken(*event):
        raise ValueError("a metrics bug")
    eng.add_recovery_listener(broken)
    events = listen(eng)
    with caplog.at_level(logging.ERROR, logger="maverick_ray.engine.engine"):
        eng._recover(DIED)
    assert [e[:2] for e in events] == [("died", None), ("died", "failed"), ("died", "ok")]
    assert events[0][2:] == (None, 0)
    (_, _, failed_s, failed_replayed), (_, _, ok_s, ok_replayed) = events[1:]
    assert (failed_replayed, ok_replayed) == (0, 2)  # the 2 admitted requests, requeued once a recovery succeeded
    assert 0 <= failed_s <= ok_s and ok_s == eng.last_recovery_seconds
    stats = eng.stats()
    assert stats["rank_failures"] == {"died": 1} and stats["recoveries"] == {"ok": 1, "failed": 1}
    assert stats["replayed_sequences"] == 2 and not stats["recovering"]
    assert sum("recovery listener failed" in r.getMessage() for r in caplog.records) == 3


def test_fail_stop_and_giving_up_tell_the_listeners_what_was_counted(tiny_ckpt):
    eng = engine(tiny_ckpt, StandInRanks(), max_recoveries=0)
    events = listen(eng)
    hung = TimeoutError("rank 0 did not finish a step within 15s")
    with pytest.raises(TimeoutError):
        eng._recover(hung)
    assert events == [("hung", None, None, 0)] and eng.ranks.restarts == 0

    eng = engine(tiny_ckpt, StandInRanks(fail=99), admitted=1, max_recoveries=2)
    events = listen(eng)
    with pytest.raises(EngineError, match="gave up after 2 recoveries"):
        eng._recover(RankFailed(0, "ValueError", "bad shape"))
    assert [(e[0], e[1], e[3]) for e in events] == [("raised", None, 0), ("raised", "failed", 0),
                                                    ("raised", "failed", 0)]


class Recorder:
    """Stands in for one ray.util.metrics metric: appends (name, op, value, tags without replica)."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def _add(self, op, value, tags):
        self.log.append((self.name, op, value, {k: v for k, v in (tags or {}).items() if k != "replica"}))

    def inc(self, value=1.0, tags=None):
        self._add("inc", value, tags)

    def set(self, value, tags=None):
        self._add("set", value, tags)

    def observe(self, value, tags=None):
        self._add("observe", value, tags)


def recorded_metrics(eng: Engine) -> tuple[EngineMetrics, list]:
    metrics, log = EngineMetrics(eng, "replica-1"), []
    metrics.m = _Defs(**{f.name: Recorder(log, f.name) for f in dataclasses.fields(_Defs)})
    return metrics, log


def test_engine_metrics_count_failures_recoveries_replays_and_the_time(tiny_ckpt):
    eng = engine(tiny_ckpt, StandInRanks(fail=1), admitted=3)
    metrics, log = recorded_metrics(eng)
    eng._recover(DIED)
    assert log == [("rank_failures", "inc", 1, {"cause": "died"}), ("recovering", "set", 1.0, {}),
                   ("recoveries", "inc", 1, {"outcome": "failed"}),
                   ("recoveries", "inc", 1, {"outcome": "ok"}), ("replayed", "inc", 3, {}),
                   ("recovery_seconds", "observe", eng.last_recovery_seconds, {}), ("recovering", "set", 0.0, {})]
    assert metrics.expert_load()["last_failure_cause"] == "died"

    eng = engine(tiny_ckpt, StandInRanks(), max_recoveries=0)  # fail-stop: counted, no recovery in progress
    metrics, log = recorded_metrics(eng)
    with pytest.raises(RankFailed):
        eng._recover(DIED)
    assert log == [("rank_failures", "inc", 1, {"cause": "died"}), ("recovering", "set", 0.0, {})]


@pytest.fixture
def page_server(tiny_ckpt):
    """The real HTTP routes on loopback over an unstarted engine with a gated stand-in rank group
    and a real EngineMetrics; yields (url, engine, gate)."""
    from maverick_ray.serve.http_api import Backend, make_api
    from maverick_ray.serve.openai_service import OpenAIService
    from maverick_ray.serve.settings import ServeSettings

    gate = threading.Event()
    eng = engine(tiny_ckpt, StandInRanks(gate=gate), admitted=2)
    settings = ServeSettings.from_args({"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1,
                                        "max_model_len": 256})
    backend = Backend(OpenAIService(eng, None, settings, "tiny"), EngineMetrics(eng, "replica-1"))
    with app_on_loopback(make_api(lambda: backend)) as url:
        try:
            yield url, eng, gate
        finally:
            gate.set()   # before the server stops: a request waiting on the gate can finish


def test_live_page_shows_the_recovery_while_it_runs_and_the_counters_after(page_server, tmp_path):
    url, eng, gate = page_server
    recovery = threading.Thread(target=eng._recover, args=(DIED,))
    recovery.start()
    try:
        assert eng.ranks.entered.wait(30) and eng.recovering
        page = dashboard_screenshot(url, tmp_path, "recovering")
        assert page["data"].get("recovering") == "1", page["dom"][-3000:]
        assert '<div id="recovery-banner">recovering: replacing ranks after a rank died</div>' in page["dom"]
        assert "<th>failures: died</th><td>1</td>" in page["dom"] and "<th>recoveries: ok</th><td>0</td>" in page["dom"]
        assert "<th>last recovery</th><td>none</td>" in page["dom"]
        assert page["png"].stat().st_size > 5000
    finally:
        gate.set()
        recovery.join(timeout=30)
    assert not eng.recovering and eng.recoveries["ok"] == 1
    page = dashboard_screenshot(url, tmp_path, "recovered", screenshot=False)
    assert page["data"].get("recovering") == "0" and '<div id="recovery-banner" hidden="">' in page["dom"]
    assert "<th>recoveries: ok</th><td>1</td>" in page["dom"] and "<th>replayed sequences</th><td>2</td>" in page["dom"]
    assert f"<th>last recovery</th><td>{eng.last_recovery_seconds:.1f} s</td>" in page["dom"]
