"""The scheduler owns each request's lifecycle state."""

from __future__ import annotations

import pytest

from maverick_ray.config import ConfigError, EngineConfig, ModelConfig
from maverick_ray.engine.request import EngineError, Request, RequestState, RequestStream
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.engine.scheduler import Scheduler

S = RequestState


def request(rid: str, n: int = 4) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4), RequestStream(rid))


def test_lifecycle_waiting_prefilling_running_finished():
    sched = Scheduler(2, EngineConfig(max_num_seqs=1, max_waiting=8))
    a, b, c = request("a"), request("b"), request("c")
    for r in (a, b, c):
        sched.add(r)
    assert [r.state for r in (a, b, c)] == [S.WAITING] * 3 and sched.num_waiting == 3
    plans, admitted = sched.plan()
    assert admitted == 2 and {a.rank, b.rank} == {0, 1}  # one slot per rank
    assert a.state is b.state is S.PREFILLING and c.state is S.WAITING
    assert [len(p.work) for p in plans] == [1, 1] and plans[0].work[0].start == 0
    a.output_ids.append(7)
    sched.first_token(a)
    assert a.state is S.RUNNING and sched.num_decoding == 1
    plans, admitted = sched.plan()  # a decodes its last token from position len(prompt)
    work = plans[a.rank].work
    assert admitted == 0 and [(w.seq_id, w.start, w.token_ids) for w in work] == [("a", 4, [7])]
    sched.finish(a)
    assert a.state is S.FINISHED and sched.load(a.rank) == 0
    plans, admitted = sched.plan()
    assert plans[a.rank].release == ["a"] and admitted == 1 and c.state is S.PREFILLING and c.rank == a.rank


def test_abort_of_a_waiting_request_leaves_the_queue():
    sched = Scheduler(1, EngineConfig(max_num_seqs=1))
    a, b = request("a"), request("b")
    sched.add(a)
    sched.add(b)
    sched.finish(b, aborted=True)
    assert b.state is S.ABORTED and sched.num_waiting == 1
    plans, admitted = sched.plan()
    assert admitted == 1 and [w.seq_id for w in plans[0].work] == ["a"] and plans[0].release == []


def test_no_transition_out_of_an_ended_state():
    sched = Scheduler(1, EngineConfig())
    a = request("a")
    sched.add(a)
    sched.finish(a)
    with pytest.raises(RuntimeError, match="finished -> aborted"):
        sched.finish(a, aborted=True)
    with pytest.raises(RuntimeError, match="not new"):
        sched.add(a)


def test_full_queue_is_refused():
    sched = Scheduler(1, EngineConfig(max_waiting=2))
    sched.add(request("a"))
    sched.add(request("b"))
    with pytest.raises(EngineError, match="full: 2 requests"):
        sched.add(request("c"))


def test_tied_embeddings_are_refused_with_the_field_named(tiny_ckpt):
    import json

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    with pytest.raises(ConfigError, match="text_config.tie_word_embeddings"):
        ModelConfig.from_dict(cfg)


def test_after_a_recovery_only_the_replaced_ranks_and_unfinished_prefills_are_replayed():
    sched = Scheduler(2, EngineConfig(max_num_seqs=2, max_waiting=8))
    a, b, c, d, e = (request(x) for x in "abcde")
    for r in (a, b, c, d):
        sched.add(r)
    sched.plan()  # a, b, c, d admitted: two per rank
    for r in (a, b, c, d):
        r.output_ids.append(9)
        sched.first_token(r)
    on = {rank: sorted(r.request_id for r in (a, b, c, d) if r.rank == rank) for rank in (0, 1)}
    kept_rank = 0
    kept = [r for r in (a, b, c, d) if r.rank == kept_rank]
    sched.finish(kept[1])  # its release rides on the step that then fails
    sched.add(e)
    failed_plans, admitted = sched.plan()  # e takes the freed slot on rank 0; the step fails
    assert admitted == 1 and e.rank == kept_rank and failed_plans[kept_rank].release == [kept[1].request_id]
    replayed = sched.requeue_admitted([1], failed_plans)
    # rank 1 was replaced: its two requests replay; e's prefill never produced a token: it replays too
    assert replayed == 3
    assert [r.request_id for r in sched._waiting] == sorted(on[1] + ["e"], key=lambda x: "abcde".index(x))
    assert kept[0].state is S.RUNNING and kept[0].rank == kept_rank  # kept its slot and KV cache
    plans, admitted = sched.plan()
    # the kept request runs the failed step's decode again; the failed step's release is sent again,
    # and e's state on rank 0 is released before its replay lands anywhere
    work = {w.seq_id: (w.start, w.token_ids) for p in plans for w in p.work}
    assert work[kept[0].request_id] == (4, [9])
    assert plans[kept_rank].release[:2] == [kept[1].request_id, "e"]
    assert admitted == 3 and all(work[r][0] == 0 for r in on[1] + ["e"])
    assert work[on[1][0]][1] == list(range(1, 5)) + [9]  # prompt + the produced token
