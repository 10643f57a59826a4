"""Continuous batching: which sequences run on which rank in the next lockstep step.

Each step every running sequence decodes one token; waiting requests are admitted (whole
prompt prefilled) onto the least-loaded rank that has a free KV cache slot and prefill budget,
so new requests join batches that are already generating.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from .request import Request
from .step_types import RankPlan, SeqWork


class Scheduler:
    def __init__(self, world_size: int, engine: EngineConfig):
        self.world = world_size
        self.engine = engine
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.free_slots = [list(range(engine.max_num_seqs - 1, -1, -1)) for _ in range(world_size)]
        self.pending_release: list[list[str]] = [[] for _ in range(world_size)]

    def load(self, rank: int) -> int:
        return self.engine.max_num_seqs - len(self.free_slots[rank])

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or any(self.pending_release))

    def finish(self, req: Request) -> None:
        """Frees the request's slot; its rank drops the request's state on the next step."""
        if req.request_id in self.running:
            del self.running[req.request_id]
            self.free_slots[req.rank].append(req.slot)
            self.pending_release[req.rank].append(req.request_id)

    def plan(self) -> tuple[list[RankPlan], int]:
        """Plans for every rank and the number of requests admitted this step."""
        plans = [RankPlan(release=self.pending_release[r]) for r in range(self.world)]
        self.pending_release = [[] for _ in range(self.world)]
        for req in self.running.values():
            if req.prefilled:
                plans[req.rank].work.append(SeqWork(req.request_id, req.slot, req.cached_tokens,
                                                    [req.output_ids[-1]]))
        budget = [self.engine.max_prefill_tokens] * self.world
        admitted = 0
        while self.waiting:
            req = self.waiting[0]
            ranks = [r for r in range(self.world)
                     if self.free_slots[r] and (budget[r] >= len(req.prompt_ids)
                                                or budget[r] == self.engine.max_prefill_tokens)]
            if not ranks:
                break
            rank = min(ranks, key=lambda r: (self.load(r), r))
            self.waiting.popleft()
            req.rank, req.slot = rank, self.free_slots[rank].pop()
            budget[rank] -= len(req.prompt_ids)
            self.running[req.request_id] = req
            plans[rank].work.append(SeqWork(req.request_id, req.slot, 0, list(req.prompt_ids), req.params,
                                            req.mm_inputs))
            admitted += 1
        most = max(sum(len(w.token_ids) for w in p.work) for p in plans)
        for p in plans:
            p.max_rank_tokens = most
        return plans, admitted
