"""Continuous batching: which sequences run on which rank in the next lockstep step.

Each step every running sequence decodes one token; waiting requests are admitted (whole
prompt prefilled) onto the least-loaded rank that has a free KV cache slot and prefill budget,
so new requests join batches that are already generating.

The scheduler owns every request's lifecycle state (request.RequestState): `add` queues
(WAITING), `plan` admits (PREFILLING), `first_token` starts decoding (RUNNING), `finish` ends
(FINISHED or ABORTED) and frees the slot. Nothing else changes a request's state. `expired`
names the requests past their deadline, queued or running, for the engine to finish.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from .request import EngineFull, Request, RequestState
from .step_types import RankPlan, SeqWork

S = RequestState
_ALLOWED = {  # state -> the states it may move to
    S.WAITING: {S.PREFILLING, S.FINISHED, S.ABORTED},
    S.PREFILLING: {S.RUNNING, S.FINISHED, S.ABORTED, S.WAITING},  # WAITING: replayed after a rank failure
    S.RUNNING: {S.FINISHED, S.ABORTED, S.WAITING},
    S.FINISHED: set(),
    S.ABORTED: set(),
}


class Scheduler:
    def __init__(self, world_size: int, engine: EngineConfig):
        self.world = world_size
        self.engine = engine
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}   # admitted: PREFILLING or RUNNING
        self.free_slots = [list(range(engine.max_num_seqs - 1, -1, -1)) for _ in range(world_size)]
        self.pending_release: list[list[str]] = [[] for _ in range(world_size)]

    @staticmethod
    def _move(req: Request, new: RequestState) -> None:
        if new not in _ALLOWED[req.state]:
            raise RuntimeError(f"request {req.request_id}: no transition {req.state.value} -> {new.value}")
        req.state = new

    # ---- what the engine reads ------------------------------------------------------------------
    def load(self, rank: int) -> int:
        return self.engine.max_num_seqs - len(self.free_slots[rank])

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_decoding(self) -> int:
        return sum(1 for r in self._running.values() if r.state is S.RUNNING)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self._running.values())

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or any(self.pending_release))

    # ---- lifecycle --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queues a new request (WAITING); EngineFull when max_waiting requests already wait."""
        if len(self._waiting) >= self.engine.max_waiting:
            raise EngineFull(f"the engine is full: {len(self._waiting)} requests already waiting")
        if req.state is not S.WAITING:
            raise RuntimeError(f"request {req.request_id} is {req.state.value}, not new")
        self._waiting.append(req)

    def first_token(self, req: Request) -> None:
        """The request's prompt has run and produced its first token: it decodes from now on."""
        if req.state is S.PREFILLING:
            self._move(req, S.RUNNING)

    def finish(self, req: Request, aborted: bool = False) -> None:
        """Ends the request (FINISHED, or ABORTED when the client went away): leaves the queue, or
        frees its slot, whose rank drops the request's state on the next step."""
        self._move(req, S.ABORTED if aborted else S.FINISHED)
        if req.request_id in self._running:
            del self._running[req.request_id]
            self.free_slots[req.rank].append(req.slot)
            self.pending_release[req.rank].append(req.request_id)
        else:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass

    def requeue_admitted(self, lost_ranks: list[int] | None = None, failed_plans: list[RankPlan] | None = None) -> int:
        """After a rank failure and recovery. Requests admitted on `lost_ranks` (replaced: their
        KV caches are gone; default every rank), and requests on any rank whose prefill had
        not produced a token yet, go back to the front of the queue in arrival order, keeping
        the tokens they have produced: their next admission prefills prompt + those tokens (a
        replay) and decoding continues. Running requests on the other ranks keep their slot and
        KV cache: the next plan runs the failed step's work again (same positions, so the KV
        entries it may have half written are overwritten alike). The failed step's releases
        (`failed_plans`) are sent again to the ranks that kept their state. Returns how many
        requests will be replayed."""
        lost = set(range(self.world) if lost_ranks is None else lost_ranks)
        replay = sorted((r for r in self._running.values() if r.rank in lost or r.state is S.PREFILLING),
                        key=lambda r: r.arrival)
        for req in replay:
            self._move(req, S.WAITING)
            del self._running[req.request_id]
            if req.rank not in lost:  # a kept rank: its slot is free again, its sampling state dropped
                self.free_slots[req.rank].append(req.slot)
                self.pending_release[req.rank].append(req.request_id)
            req.rank = req.slot = None
        self._waiting.extendleft(reversed(replay))
        for r in range(self.world):
            if r in lost:
                self.free_slots[r] = list(range(self.engine.max_num_seqs - 1, -1, -1))
                self.pending_release[r] = []
            elif failed_plans is not None:
                self.pending_release[r][:0] = failed_plans[r].release
        return len(replay)

    def expired(self, now: float) -> list[Request]:
        """Live requests, waiting or admitted, whose deadline is at or before `now` (monotonic);
        the engine ends each with `finish`."""
        live = list(self._waiting) + list(self._running.values())
        return [r for r in live if r.deadline is not None and r.deadline <= now]

    def plan(self) -> tuple[list[RankPlan], int]:
        """Plans for every rank and the number of requests admitted this step."""
        plans = [RankPlan(release=self.pending_release[r]) for r in range(self.world)]
        self.pending_release = [[] for _ in range(self.world)]
        for req in self._running.values():
            if req.state is S.RUNNING:
                plans[req.rank].work.append(SeqWork(req.request_id, req.slot, req.cached_tokens,
                                                    [req.output_ids[-1]]))
        budget = [self.engine.max_prefill_tokens] * self.world
        admitted = 0
        while self._waiting:
            req = self._waiting[0]
            context = req.prompt_ids + req.output_ids  # a replayed request's produced tokens are context too
            ranks = [r for r in range(self.world)
                     if self.free_slots[r] and (budget[r] >= len(context)
                                                or budget[r] == self.engine.max_prefill_tokens)]
            if not ranks:
                break
            rank = min(ranks, key=lambda r: (self.load(r), r))
            self._waiting.popleft()
            self._move(req, S.PREFILLING)
            req.rank, req.slot = rank, self.free_slots[rank].pop()
            budget[rank] -= len(context)
            self._running[req.request_id] = req
            plans[rank].work.append(SeqWork(req.request_id, req.slot, 0, context, req.params, req.mm_inputs))
            admitted += 1
        most = max(sum(len(w.token_ids) for w in p.work) for p in plans)
        for p in plans:
            p.max_rank_tokens = most
        return plans, admitted
