"""An in-process rank builds, steps and answers calls on one dedicated thread (engine/ranks.py
ComputeThread): on CPU a second computing thread costs a second OpenMP team."""

from __future__ import annotations

import threading

from maverick_ray.config import EngineConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.ranks import ComputeThread
from maverick_ray.engine.sampling import SamplingParams


def test_compute_thread_runs_every_call_on_the_same_thread():
    ct = ComputeThread("t")
    try:
        idents = {ct.run(threading.get_ident) for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents
        assert ct.run(lambda a, b: a + b, 2, 3) == 5
    finally:
        ct.shutdown()


def test_local_rank_builds_steps_and_calls_on_one_thread(tiny_ckpt, monkeypatch):
    import maverick_ray.engine.ranks as ranks

    built_on, called_on = [], set()

    class Recording(ranks.RankWorker):
        def __init__(self, *args, **kw):
            built_on.append(threading.current_thread())
            super().__init__(*args, **kw)

        def info(self):  # reached through LocalRanks.start and LocalRanks.call
            called_on.add(threading.current_thread())
            return super().info()

    monkeypatch.setattr(ranks, "RankWorker", Recording)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=64)) as eng:
        stepped_on = set()
        eng.ranks.worker.model.register_forward_pre_hook(lambda m, a: stepped_on.add(threading.current_thread()))
        out = eng.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert eng.ranks.call("info")[0]["rank"] == 0
    assert len(out["token_ids"]) == 3
    assert stepped_on == {built_on[0]} == called_on
    assert built_on[0] is not threading.main_thread() and built_on[0].name.startswith("maverick-rank0")


def test_preprocessing_runs_on_the_in_process_rank_thread(tiny_ckpt):
    """Image preprocessing computes with torch; on another thread of the process it would start a
    second OpenMP team and slow every later step, so an EP=1 engine runs it on the rank's thread."""
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=64)) as eng:
        stepped_on = set()
        eng.ranks.worker.model.register_forward_pre_hook(lambda m, a: stepped_on.add(threading.current_thread()))
        eng.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        ran_on = eng.submit_preprocessing(lambda x: (threading.current_thread(), x * 2), 21).result(timeout=30)
    assert ran_on[1] == 42
    assert stepped_on == {ran_on[0]} and ran_on[0] is not threading.main_thread()

