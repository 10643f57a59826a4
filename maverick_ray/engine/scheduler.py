"""Continuous batching over paged KV caches: which sequences run on which rank in the next step.

Every step, on every rank: each running sequence decodes one token; prefills in progress get
their next chunk; waiting requests are admitted onto the least-loaded rank with room. A rank
runs at most `max_prefill_tokens` prompt tokens per step (chunked prefill): a long prompt is
split over several steps while the running sequences keep decoding in the same steps; while
they decode, the PrefillPacer (engine/prefill_pacer.py) shrinks that budget to what keeps a step
within `max_decode_slowdown` times a decode-only step. KV
memory is pages (engine/kv_blocks.py); when a rank runs out, the request admitted last on it is
preempted: its pages are freed and it goes back to the front of the queue, to be prefilled
again (prompt + the tokens it produced) when pages free up, as vLLM's recompute preemption.

The scheduler owns every request's lifecycle state (request.RequestState): `add` queues
(WAITING), `plan` admits (PREFILLING), `first_token` starts decoding (RUNNING), `finish` ends
(FINISHED or ABORTED) and frees its pages; preemption and `requeue_admitted` move admitted
requests back to WAITING. Nothing else changes a request's state. `commit` records a step that
ran; `expired` names the requests past their deadline, queued or running.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from ..model.kv_cache import KVLayout
from .kv_blocks import BlockTables, block_hashes
from .prefill_pacer import PrefillPacer
from .request import EngineFull, Request, RequestState
from .step_types import RankPlan, SeqWork

S = RequestState
_ALLOWED = {  # state -> the states it may move to
    S.WAITING: {S.PREFILLING, S.FINISHED, S.ABORTED},
    S.PREFILLING: {S.RUNNING, S.FINISHED, S.ABORTED, S.WAITING},  # WAITING: preempted, or replayed after a rank failure
    S.RUNNING: {S.FINISHED, S.ABORTED, S.WAITING},
    S.FINISHED: set(),
    S.ABORTED: set(),
}


class Scheduler:
    def __init__(self, world_size: int, engine: EngineConfig, layout: KVLayout | None = None,
                 pages_per_rank: int | None = None):
        """`layout` and `pages_per_rank` describe each rank's paged KV cache (the ranks report
        their pages once started: `set_kv`); until then a rank is treated as having room for
        max_num_seqs sequences of max_model_len tokens."""
        self.world = world_size
        self.engine = engine
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}   # admitted: PREFILLING or RUNNING
        self.pending_release: list[list[str]] = [[] for _ in range(world_size)]
        self.preemptions = 0
        self.prefill_tokens_last_step = 0   # all ranks
        self.prefill_tokens_busiest = 0     # the most any one rank ran (what the pacer measures)
        self.decodes_last_step = 0
        self.pacer = PrefillPacer(engine.max_prefill_tokens, engine.max_decode_slowdown, engine.min_prefill_chunk)
        self.layout = layout
        self.pages_per_rank = pages_per_rank or 0
        self.blocks = [self._tables() for _ in range(world_size)] if layout else []
        self.image_token: int | None = None   # the patch token id (image blocks hash their images too)
        self.prefix_queried = 0   # prompt tokens looked up in the prefix cache at admission
        self.prefix_hit = 0       # of those, tokens found cached (not prefilled again)

    def _tables(self) -> BlockTables:
        return BlockTables(self.layout, self.pages_per_rank, caching=self.engine.prefix_caching == "on")

    def set_kv(self, layout: KVLayout, pages_per_rank: int, image_token: int | None = None) -> None:
        """The ranks' KV caches (before any request is admitted)."""
        self.layout, self.pages_per_rank, self.image_token = layout, pages_per_rank, image_token
        self.blocks = [self._tables() for _ in range(self.world)]

    @staticmethod
    def _move(req: Request, new: RequestState) -> None:
        if new not in _ALLOWED[req.state]:
            raise RuntimeError(f"request {req.request_id}: no transition {req.state.value} -> {new.value}")
        req.state = new

    # ---- what the engine reads ------------------------------------------------------------------
    def load(self, rank: int) -> int:
        """Sequences admitted on the rank."""
        return sum(1 for r in self._running.values() if r.rank == rank)

    def pages_used(self, rank: int) -> int:
        return self.blocks[rank].used if self.blocks else 0

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
        return sum(r.cached_tokens if r.state is S.RUNNING else r.prefilled for r in self._running.values())

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
        frees its pages; its rank drops the request's state on the next step."""
        self._move(req, S.ABORTED if aborted else S.FINISHED)
        if req.request_id in self._running:
            self._unadmit(req)
        else:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass

    def _unadmit(self, req: Request) -> None:
        """Takes an admitted request off its rank: pages freed, rank state released."""
        del self._running[req.request_id]
        if self.blocks:
            self.blocks[req.rank].release(req.request_id)
        self.pending_release[req.rank].append(req.request_id)

    def _requeue(self, reqs: list[Request]) -> None:
        """Admitted requests back to the front of the queue in arrival order, keeping their
        produced tokens: their next admission prefills prompt + those tokens (a replay)."""
        reqs = sorted(reqs, key=lambda r: r.arrival)
        for req in reqs:
            self._move(req, S.WAITING)
            self._unadmit(req)
            req.rank, req.prefilled = None, 0
        self._waiting.extendleft(reversed(reqs))

    def requeue_admitted(self, lost_ranks: list[int] | None = None, failed_plans: list[RankPlan] | None = None) -> int:
        """After a rank failure and recovery. Requests admitted on `lost_ranks` (replaced: their
        KV caches are gone; default every rank), and requests on any rank whose prefill had
        not produced a token yet, go back to the front of the queue (a replay). Running requests
        on the other ranks keep their pages and KV cache: the next plan runs the failed step's
        work again (same positions, so the KV entries it may have half written are overwritten
        alike). The failed step's releases (`failed_plans`) are sent again to the ranks that
        kept their state. Returns how many requests will be replayed."""
        lost = set(range(self.world) if lost_ranks is None else lost_ranks)
        replay = [r for r in self._running.values() if r.rank in lost or r.state is S.PREFILLING]
        self._requeue(replay)
        for r in range(self.world):
            if r in lost:
                if self.blocks:
                    self.blocks[r] = self._tables()
                self.pending_release[r] = []
            elif failed_plans is not None:
                self.pending_release[r][:0] = failed_plans[r].release
        return len(replay)

    def expired(self, now: float) -> list[Request]:
        """Live requests, waiting or admitted, whose deadline is at or before `now` (monotonic);
        the engine ends each with `finish`."""
        live = list(self._waiting) + list(self._running.values())
        return [r for r in live if r.deadline is not None and r.deadline <= now]

    def commit(self, plans: list[RankPlan]) -> None:
        """A step ran: prefill chunks that did not sample advance their request, and chunked
        layers give back the blocks of chunks their sequences have left."""
        for plan in plans:
            for w in plan.work:
                req = self._running.get(w.seq_id)
                if req is None:
                    continue
                if not w.sample:
                    req.prefilled += len(w.token_ids)
                if self.blocks:
                    length = w.start + len(w.token_ids)
                    tables = self.blocks[req.rank]
                    if tables.caching:
                        self._hash(req, length)
                        tables.register(w.seq_id, req.block_hashes, length)
                    tables.trim(w.seq_id, length)

    def _hash(self, req: Request, length: int) -> None:
        """Extends req.block_hashes over the full blocks of its first `length` context tokens."""
        if len(req.block_hashes) < length // self.layout.block_size:
            req.block_hashes = block_hashes((req.prompt_ids + req.output_ids)[:length], self.layout.block_size,
                                            req.block_hashes, self.image_token, req.image_key)

    # ---- planning -----------------------------------------------------------------------------------
    def _give_pages(self, req: Request, start: int, end: int, plans: list[RankPlan]) -> bool:
        """Pages for req's step over start..end-1, preempting the requests admitted last on its
        rank (never one already in this step's plan) until they fit. False when they cannot."""
        if not self.blocks:
            return True
        tables = self.blocks[req.rank]
        planned = {w.seq_id for w in plans[req.rank].work}
        while tables.pages_needed(req.request_id, start, end) > tables.available:
            victims = [r for r in self._running.values()
                       if r.rank == req.rank and r is not req and r.request_id not in planned]
            if not victims:
                return False
            victim = max(victims, key=lambda r: r.arrival)
            self._requeue([victim])
            self.preemptions += 1
        return True

    def _work(self, req: Request, start: int, tokens: list[int], **kw) -> SeqWork:
        first, pages = self.blocks[req.rank].allocate(req.request_id, start, start + len(tokens)) if self.blocks \
            else ([], [])
        return SeqWork(req.request_id, start, tokens, first=first, pages=pages, **kw)

    def plan(self) -> tuple[list[RankPlan], int]:
        """Plans for every rank and the number of requests admitted this step."""
        plans = [RankPlan(release=self.pending_release[r]) for r in range(self.world)]
        self.pending_release = [[] for _ in range(self.world)]
        decoding = sorted((r for r in self._running.values() if r.state is S.RUNNING), key=lambda r: r.arrival)
        step_budget = self.pacer.budget(bool(decoding))
        budget = [step_budget] * self.world
        # Running decodes first, oldest first: a preemption takes the newest.
        decodes = 0
        for req in decoding:
            if req.request_id not in self._running:  # preempted for an older one this step
                continue
            start = req.cached_tokens
            if not self._give_pages(req, start, start + 1, plans):
                self._requeue([req])
                self.preemptions += 1
                continue
            plans[req.rank].work.append(self._work(req, start, [req.output_ids[-1]]))
            decodes += 1
        # Prefills in progress: their next chunk.
        for req in sorted((r for r in self._running.values() if r.state is S.PREFILLING), key=lambda r: r.arrival):
            self._prefill_chunk(req, plans, budget)
        # Then new admissions, least-loaded rank first.
        admitted, deferred = 0, []
        while self._waiting:
            req = self._waiting[0]
            ranks = [r for r in range(self.world)
                     if self.load(r) < self.engine.max_num_seqs and budget[r] > 0 and self._fits_new(req, r)]
            if not ranks:
                break
            hit = self._cached_blocks(req, ranks)
            if self._prefix_in_flight(req, max(hit.values()) if hit else 0):
                deferred.append(self._waiting.popleft())  # admitted once that prefill has cached it
                continue
            # The rank holding the longest cached prefix, else the least loaded.
            rank = min(ranks, key=lambda r: (-hit[r], self.load(r), r))
            self._waiting.popleft()
            self._move(req, S.PREFILLING)
            req.rank, req.prefilled = rank, 0
            self._running[req.request_id] = req
            if self.blocks and self.blocks[rank].caching:
                self.blocks[rank].adopt(req.request_id, req.block_hashes, hit[rank])
                req.prefilled = hit[rank] * self.layout.block_size
                if req.cached_prompt_tokens is None:  # the first admission's hit is what the client is told
                    req.cached_prompt_tokens = min(req.prefilled, len(req.prompt_ids))
                    self.prefix_queried += len(req.prompt_ids)
                    self.prefix_hit += req.cached_prompt_tokens
            if not self._prefill_chunk(req, plans, budget, first=True):
                self._requeue([req])  # no pages after all: wait at the front
                break
            admitted += 1
        self._waiting.extendleft(reversed(deferred))
        most = max(sum(len(w.token_ids) for w in p.work) for p in plans)
        for p in plans:
            p.max_rank_tokens = most
        self.prefill_tokens_last_step = sum(step_budget - b for b in budget)
        self.prefill_tokens_busiest = max(step_budget - b for b in budget)
        self.decodes_last_step = decodes
        return plans, admitted

    def _cached_blocks(self, req: Request, ranks: list[int]) -> dict[int, int]:
        """Per rank, the blocks of the request's context cached there (one token is always left
        to run: its logits give the next token)."""
        if not (self.blocks and self.engine.prefix_caching == "on"):
            return {r: 0 for r in ranks}
        n = len(req.prompt_ids) + len(req.output_ids)
        self._hash(req, n)
        most = (n - 1) // self.layout.block_size
        return {r: self.blocks[r].longest_prefix(req.block_hashes, most) for r in ranks}

    def _prefix_in_flight(self, req: Request, cached: int) -> bool:
        """Whether a prefill now running shares more of req's full blocks than the cache holds
        yet (the n choices of one request, a burst of prompts with one system prompt): req then
        waits for those blocks instead of computing them a second time."""
        if not (self.blocks and self.engine.prefix_caching == "on"):
            return False
        usable = (len(req.prompt_ids) + len(req.output_ids) - 1) // self.layout.block_size
        if cached >= usable:
            return False
        nxt = req.block_hashes[cached]  # chained: equal hashes mean equal prefixes up to there
        return any(o.state is S.PREFILLING and len(o.block_hashes) > cached and o.block_hashes[cached] == nxt
                   for o in self._running.values())

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Tokens of the request's context its next prefill step runs: all that is left when it
        carries images (an image prompt is never split) or fits the budget, else the budget."""
        left = len(req.prompt_ids) + len(req.output_ids) - req.prefilled
        return left if req.mm_inputs is not None or left <= budget else budget

    def _fits_new(self, req: Request, rank: int) -> bool:
        """Whether the rank has free pages for the request's first chunk (without preempting)."""
        if not self.blocks:
            return True
        n = self._chunk_len(req, self.engine.max_prefill_tokens)
        return self.blocks[rank].pages_needed(req.request_id, 0, n) <= self.blocks[rank].available

    def _prefill_chunk(self, req: Request, plans: list[RankPlan], budget: list[int], first: bool = False) -> bool:
        """Plans the request's next prefill chunk within its rank's budget (an image prompt, or
        a new request on a rank with its whole budget left, may exceed it). False when no
        pages could be found."""
        r = req.rank
        if budget[r] <= 0 and not first:
            return True  # next step
        context = req.prompt_ids + req.output_ids  # a replayed request's produced tokens are context too
        n = self._chunk_len(req, max(budget[r], 1))
        start = req.prefilled
        if not self._give_pages(req, start, start + n, plans):
            return False
        last = start + n == len(context)
        mm = req.mm_inputs is not None
        plans[r].work.append(self._work(req, start, context[start:start + n], sample=last, params=req.params,
                                        mm_inputs=req.mm_inputs if mm else None,
                                        mm_offset=context[:start].count(self.image_token) if mm else 0))
        budget[r] -= n
        return True
