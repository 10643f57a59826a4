"""The engine: requests in, tokens out, one lockstep step over all EP ranks at a time.

Protocol the serving layer relies on: `add_request`, iterating the returned stream (sync or
async), `abort`, `stats`, `healthy`. Steps run in a background thread over a RankGroup
(engine/ranks.py); a rank that raises, dies or misses its step deadline is replaced, the other
ranks keep their weights and KV caches, and the sequences that lived on the replaced rank are
replayed (`_recover`); past max_recoveries the engine fails every request
with an EngineError and marks itself unhealthy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..config import EngineConfig, ModelConfig, ParallelConfig
from .deadline import StepDeadline
from .live_eplb import POLL_S as EPLB_POLL_S, LiveRebalancer   # idle with a rebalance staging: poll as it does
from .ranks import RankGroup
from .step_channel import RankFailed
from .request import EngineError, Request, RequestState, RequestStream, RequestTimedOut, TokenEvent
from .sampling import InvalidRequest, SamplingParams, TokenLogprobs
from .scheduler import Scheduler
from .seq_history import attach_history
from .text_output import TextOutput
from .token_classes import TokenClassLoad

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # while idle, the engine checks this often that every rank is alive
RANK_START_TIMEOUT_S = 600.0  # a replacement rank group must be up within this (weights load)


def _image_key(mm_inputs: Any) -> int | None:
    """The images' content as one number (prefix caching keys image blocks by it)."""
    pixels = mm_inputs.get("pixel_values") if isinstance(mm_inputs, dict) else None
    if pixels is None:
        return None
    import hashlib

    data = pixels.detach().contiguous().cpu().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def failure_cause(exc: Exception) -> str:
    """died (its process exited), hung (missed its deadline) or raised (an error in the step)."""
    if isinstance(exc, TimeoutError):
        return "hung"
    if isinstance(exc, RankFailed) and exc.kind == "ConnectionError":
        return "died"
    return "raised"


@dataclass
class StepStats:
    step: int
    seconds: float
    num_seqs: int
    num_tokens: int
    admitted: int                        # requests whose prefill ran this step
    joined_running_batch: bool           # admitted while other sequences were decoding
    expert_counts: list[list[int]]       # per MoE layer, tokens routed to each expert (all ranks)
    rank_received: list[list[int]]       # per rank, per MoE layer, rows its experts received
    rank_tokens: list[int]               # per rank, tokens it ran this step
    a2a_seconds: list[float]             # per rank
    a2a_bytes: list[int]                 # per rank
    phase_seconds: dict[str, float] = field(default_factory=dict)  # max over ranks
    rank_expert_seconds: list[float] = field(default_factory=list)  # per rank, its routed experts' time (phase timing)
    prefill_tokens: int = 0              # prompt tokens run this step (all ranks)
    decodes: int = 0                     # sequences that decoded a token this step


class Engine:
    def __init__(self, checkpoint: str | Path, parallel: ParallelConfig | None = None,
                 engine: EngineConfig | None = None, use_ray: bool | None = None, progress: bool = False,
                 tokenizer: Any = None):
        self.checkpoint = Path(checkpoint)
        self.parallel = parallel or ParallelConfig()
        self.engine_cfg = engine or EngineConfig()
        self.model_config = ModelConfig.from_pretrained(self.checkpoint)
        self.use_ray = self.parallel.ep_size > 1 if use_ray is None else use_ray
        self.progress = progress
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(self.parallel.ep_size, self.engine_cfg)
        self._deadline = self._new_deadline()
        self.failures: dict[str, int] = {}          # rank failures by cause: died | hung | raised
        self.recoveries = {"ok": 0, "failed": 0}    # rank-group replacements by outcome
        self.replayed_sequences = 0
        self.replaced_ranks = 0                     # ranks replaced by recoveries (the others kept their state)
        self.recovering = False
        self.last_recovery_seconds: float | None = None
        self._recovery_starts: list[float] = []
        self.stop_ids = set(self.model_config.text.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self._aborts: deque[str] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self.step_count = 0
        # tokens per (MoE layer, token class, expert) since start: /v1/expert-load's by_token_class
        self.token_class_load = TokenClassLoad(self.model_config.text.moe_layers,
                                               self.model_config.text.num_local_experts)
        self.finished: dict[str, int] = {}   # requests ended, by finish reason
        self.last_step: StepStats | None = None
        self._listeners: list[Callable[[StepStats], None]] = []
        self._finish_listeners: list[Callable[[Request, str, float], None]] = []
        self._recovery_listeners: list[Callable[[str, str | None, float | None, int], None]] = []
        self.ranks: RankGroup | None = None
        self.eplb = None   # LiveRebalancer (engine/live_eplb.py) with parallel.eplb on
        self.max_model_len = self.engine_cfg.max_model_len  # resolved from the KV cache by start()
        self.kv_layout = None
        self.kv_page_bytes = 0

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Engine":
        from .ranks import LocalRanks, RayRanks

        if self.use_ray:
            self.ranks = RayRanks(self.checkpoint, self.engine_cfg, self.parallel, self.progress)
        else:
            if self.parallel.ep_size != 1:
                raise ValueError("expert parallelism over several ranks needs Ray (use_ray=True)")
            self.ranks = LocalRanks(self.checkpoint, self.engine_cfg, self.progress)
        self.ranks.start(self.model_config.text.num_local_experts)
        if self.parallel.eplb == "on" and self.parallel.ep_size > 1:
            p = self.parallel
            self.eplb = LiveRebalancer(self, p.eplb_window_steps, p.eplb_interval_steps, p.eplb_min_imbalance)
        self._set_kv()
        self._thread = threading.Thread(target=self._loop, name="maverick-engine", daemon=True)
        self._thread.start()
        return self

    def _set_kv(self) -> None:
        """The ranks' paged KV caches: the scheduler's page tables and the context length."""
        from ..model.kv_cache import KVLayout
        from .kv_budget import resolve_max_model_len
        from .worker import resolve_device_dtype

        text = self.model_config.text
        layout = KVLayout.from_config(text, self.engine_cfg.kv_block_size)
        try:
            self.max_model_len = resolve_max_model_len(self.engine_cfg, text, layout, self.ranks.kv_pages,
                                                       resolve_device_dtype(self.engine_cfg)[1])
        except Exception:
            self.ranks.shutdown()
            raise
        self.kv_layout = layout
        self.kv_page_bytes = layout.page_bytes(resolve_device_dtype(self.engine_cfg)[1])
        self.scheduler.set_kv(layout, self.ranks.kv_pages, self.model_config.image_token_id)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all("the engine was shut down")
        if self.ranks is not None:
            self.ranks.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def add_finish_listener(self, fn: Callable[[Request, str, float], None]) -> None:
        """fn(request, finish reason, monotonic time) when a request ends."""
        self._finish_listeners.append(fn)

    def add_recovery_listener(self, fn: Callable[[str, str | None, float | None, int], None]) -> None:
        """fn(cause, outcome, seconds, replayed) from the engine thread: outcome None when a rank
        failure (cause died | hung | raised) was counted, before any restart; then "ok" or
        "failed" after each restart of the ranks, with the seconds since the failure and the
        sequences that restart requeued for a replay. A listener that raises is logged."""
        self._recovery_listeners.append(fn)

    def submit_preprocessing(self, fn: Callable, *args):
        """Runs request preprocessing that computes with torch (images) where it does not slow
        the ranks: on the in-process rank's own thread, between steps, or on a helper thread
        when the ranks are Ray actors. Returns a concurrent.futures.Future of fn(*args)."""
        if self.ranks is None:
            raise EngineError("the engine is not started")
        return self.ranks.submit_host_work(fn, *args)

    def force_expert(self, expert: int | None) -> None:
        """Test hook: every rank routes every token to `expert` (None restores the router). The
        prefix cache is dropped: blocks computed with the other routing would not match."""
        self.ranks.call("force_expert", expert)
        self._forget_prefix_cache()

    def skew_routing(self, strength: float | None, exponent: float = 1.2, hottest: int = 0) -> None:
        """Test and benchmark hook: a Zipf-shaped router. Every rank adds strength * log of a
        Zipf weight to its router logits (the k-th expert from `hottest` on, wrapping around:
        (k + 1) ** -exponent), so the experts from `hottest` on win most tokens,
        deterministically (outputs depend on the input only). None restores the router. Drops
        the prefix cache, like force_expert."""
        import math

        E = self.model_config.text.num_local_experts
        bias = None if strength is None else [-strength * exponent * math.log((e - hottest) % E + 1)
                                              for e in range(E)]
        self.ranks.call("skew_routing", bias)
        self._forget_prefix_cache()

    def _forget_prefix_cache(self) -> None:
        """Drops every rank's cached prefix blocks (computed under routing that has changed)."""
        with self._cv:
            for tables in self.scheduler.blocks:
                tables.forget_cached()

    def _new_deadline(self) -> StepDeadline:
        cfg = self.engine_cfg
        return StepDeadline(cfg.step_deadline_factor, cfg.step_deadline_floor_s, cfg.step_timeout_s)

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, mm_inputs: Any = None,
                    timeout_s: float | None = None) -> RequestStream:
        """Queues a request; raises InvalidRequest for bad input, EngineError when unhealthy or
        EngineFull when full. `timeout_s`: seconds from now after which the request ends with
        finish_reason "timeout", queued or running (never later than request_deadline_s)."""
        params = (params or SamplingParams()).validate(self.model_config.text.vocab_size)
        if params.seed is None and not params.greedy:  # a seed of its own: a replay draws the same tokens
            params = dataclasses.replace(params, seed=secrets.randbits(62))
        timeout_s = self._request_timeout(timeout_s)
        if self.error is not None:
            raise EngineError(f"engine is unhealthy: {self.error}")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model_config.text.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit}",
                                 "messages")
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                 f"the context length {limit}", "max_tokens")
        if mm_inputs is not None:
            from .multimodal import check_mm_inputs

            check_mm_inputs(prompt_ids, mm_inputs, self.model_config)
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this checkpoint has none", "stop")
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id)
        req = Request(request_id, list(prompt_ids), params, stream, mm_inputs, timeout_s=timeout_s,
                      image_key=_image_key(mm_inputs))
        with self._cv:
            if self.error is not None:  # checked again under the lock the failure path holds
                raise EngineError(f"engine is unhealthy: {self.error}")
            if request_id in self._requests:
                raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
            self.scheduler.add(req)  # EngineFull when the queue is full
            self._requests[request_id] = req
            self._cv.notify_all()
        return stream

    def _request_timeout(self, timeout_s: float | None) -> float | None:
        """The request's own timeout, capped by request_deadline_s; None: no deadline."""
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not math.isfinite(timeout_s) or timeout_s <= 0):
            raise InvalidRequest(f"timeout must be a positive number of seconds, got {timeout_s!r}", "timeout")
        limits = [t for t in (timeout_s, self.engine_cfg.request_deadline_s) if t]
        return float(min(limits)) if limits else None

    def _expire_deadlines(self) -> None:
        """Ends every request past its deadline, queued or running (under _cv, before a plan):
        finish_reason "timeout", and its KV pages are freed like an abort's."""
        for req in self.scheduler.expired(time.monotonic()):
            where = ("while waiting in the queue" if req.state is RequestState.WAITING
                     else f"after {len(req.output_ids)} generated tokens")
            self._finish(req, "timeout", error=f"the request passed its deadline of {req.timeout_s:g} s {where}")

    def abort(self, request_id: str) -> None:
        """Stops a request; its KV cache pages are freed at the next step."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify_all()

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, **kw) -> dict:
        """Blocking convenience: runs one request to completion."""
        stream = self.add_request(prompt_ids, params, **kw)
        ids, text, reason = [], [], None
        for ev in stream:
            if ev.token_id is not None:
                ids.append(ev.token_id)
            text.append(ev.text)
            if ev.finished:
                if ev.finish_reason == "timeout":
                    raise RequestTimedOut(ev.error)
                if ev.finish_reason == "error":
                    raise EngineError(ev.error)
                reason = ev.finish_reason
        return {"token_ids": ids, "text": "".join(text), "finish_reason": reason}

    def stats(self) -> dict:
        with self._cv:
            ep = self.parallel.ep_size
            pages = (self.ranks.kv_pages or 0) if self.ranks else 0
            block = self.engine_cfg.kv_block_size
            return {"healthy": self.healthy, "error": self.error, "steps": self.step_count,
                    "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                    "max_model_len": self.max_model_len,
                    "kv_pages_used": sum(self.scheduler.pages_used(r) for r in range(ep)), "kv_pages_total": pages * ep,
                    "kv_block_size": block, "kv_page_bytes": self.kv_page_bytes,
                    "kv_tokens_used": self.scheduler.cached_tokens,
                    "preemptions": self.scheduler.preemptions,
                    "prefix_cache_queried_tokens": self.scheduler.prefix_queried,
                    "prefix_cache_hit_tokens": self.scheduler.prefix_hit,
                    "prefill_tokens_last_step": self.scheduler.prefill_tokens_last_step,
                    "prefill_budget": self.scheduler.pacer.budget(self.scheduler.num_decoding > 0),
                    "ep_size": self.parallel.ep_size, "finished": dict(self.finished),
                    "rank_failures": dict(self.failures), "recoveries": dict(self.recoveries),
                    "recovering": self.recovering, "replayed_sequences": self.replayed_sequences,
                    "replaced_ranks": self.replaced_ranks,
                    "last_recovery_seconds": self.last_recovery_seconds,
                    "rank_start_seconds": dict(self.ranks.start_seconds) if self.ranks else {},
                    "spare_ranks_ready": spares.ready() if (spares := getattr(self.ranks, "spares", None)) else 0,
                    "eplb": dict(self.eplb.stats) if self.eplb else None,
                    "ranks": [{**{k: i.get(k) for k in ("rank", "node_ip", "node_id", "pid", "experts", "collectives",
                                                       "device", "cuda_graphs", "cuda_graphs_off")},
                               "running": self.scheduler.load(r), "kv_pages_used": self.scheduler.pages_used(r)}
                              for r, i in enumerate(self.ranks.infos if self.ranks else [])]}

    # ---- the step loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        """Steps while there is work; while idle, checks every HEARTBEAT_S that the ranks are
        alive. Any exception (a rank that raised, died or hung; a bug in planning or in
        finishing a step) marks the engine unhealthy and fails every request: the thread never
        ends silently."""
        try:
            while self._run_once():
                pass
        except Exception as e:
            self._mark_unhealthy(e)

    def _run_once(self) -> bool:
        """One step, or one idle heartbeat; False when the engine stops."""
        with self._cv:
            if not self._stopping and not self.scheduler.has_work and not self._aborts:
                self._cv.wait(EPLB_POLL_S if self.eplb is not None and self.eplb.busy else HEARTBEAT_S)
            if self._stopping:
                return False
            self._apply_aborts()
            self._expire_deadlines()
            if not self.scheduler.has_work:
                idle = True
            else:
                idle = False
                decoding = self.scheduler.num_decoding
                plans, admitted = self.scheduler.plan()
                attach_history(plans, self._requests)  # penalties / grammar state for new sequences
        t0 = time.perf_counter()
        try:
            if idle:
                self.ranks.check_alive(HEARTBEAT_S * 5)
                if self.eplb is not None and self.eplb.busy:   # a rebalance asked for or staged
                    self.eplb.after_step(self.step_count)       # completes without traffic too
                return True
            results = self.ranks.step(plans, self._deadline.for_step(plans[0].max_rank_tokens))
        except Exception as e:  # a rank died, raised or hung: replace it, replay its sequences, go on
            self._recover(e, None if idle else plans)
            return True
        seconds = time.perf_counter() - t0
        self._deadline.record(seconds, plans[0].max_rank_tokens)
        self._finish_step(plans, results, admitted, decoding, seconds)
        if self.eplb is not None:
            try:
                self.eplb.after_step(self.step_count)
            except Exception as e:  # a rank failed during a rebalance: the same recovery
                self._recover(e, None)
        return True

    def _recover(self, exc: Exception, failed_plans=None) -> None:
        """Replaces the failed ranks (RankGroup.recover; the others keep their weights and KV
        caches) and requeues the sequences that lost their KV cache for a replay (prompt +
        produced tokens), so clients see a pause, not an error. Recoveries that fail are
        retried; past max_recoveries within recovery_window_s it raises, and the loop marks the
        engine unhealthy (Serve then replaces the replica)."""
        cfg = self.engine_cfg
        cause = failure_cause(exc)
        with self._cv:
            self.failures[cause] = self.failures.get(cause, 0) + 1
        self._notify_recovery(cause, None, None, 0)
        if cfg.max_recoveries == 0:
            raise exc  # recovery is off: fail-stop
        log.warning("rank failure (%s): %s; replacing the failed ranks", cause, exc)
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            self._recovery_starts = [t for t in self._recovery_starts if now - t < cfg.recovery_window_s]
            if len(self._recovery_starts) >= cfg.max_recoveries:
                raise EngineError(f"gave up after {len(self._recovery_starts)} recoveries within "
                                  f"{cfg.recovery_window_s:g} s; last failure: {exc}") from exc
            self._recovery_starts.append(now)
            with self._cv:
                self.recovering = True
            try:
                lost = self.ranks.recover(exc, RANK_START_TIMEOUT_S)
                if self.eplb is not None:
                    self.eplb.resync()
            except Exception as e:  # e.g. the checkpoint became unreadable, no room for an actor
                log.error("recovery failed: %s: %s", type(e).__name__, e)
                with self._cv:
                    self.recoveries["failed"] += 1
                self._notify_recovery(cause, "failed", time.monotonic() - t0, 0)
                exc = e
                continue
            with self._cv:
                replayed = self.scheduler.requeue_admitted(lost, failed_plans)
                self.replayed_sequences += replayed
                self.replaced_ranks += len(lost)
                self.recovering = False
                self.recoveries["ok"] += 1
                self.last_recovery_seconds = time.monotonic() - t0
            self._deadline = self._new_deadline()  # new ranks: measure their steps afresh
            self._notify_recovery(cause, "ok", self.last_recovery_seconds, replayed)
            log.warning("rank(s) %s replaced in %.1f s (%s); %d sequences replayed", lost,
                        self.last_recovery_seconds,
                        ", ".join(f"{k} {v:.1f} s" for k, v in self.ranks.start_seconds.items()), replayed)
            return

    def _notify_recovery(self, *event) -> None:
        for fn in self._recovery_listeners:
            try:
                fn(*event)
            except Exception:  # a metrics bug must not stop a recovery
                log.exception("recovery listener failed")

    def _apply_aborts(self) -> None:
        while self._aborts:
            req = self._requests.get(self._aborts.popleft())
            if req is not None:
                self._finish(req, "abort")

    def _finish_step(self, plans, results, admitted, decoding, seconds) -> None:
        with self._cv:
            self.scheduler.commit(plans)
            self.scheduler.pacer.record(seconds, self.scheduler.decodes_last_step, self.scheduler.prefill_tokens_busiest)
            for res in results:
                for seq_id, token in res.tokens.items():
                    req = self._requests.get(seq_id)
                    if req is not None:
                        self._on_token(req, token, res.logprobs.get(seq_id))
            self.step_count += 1
            stats = self._step_stats(results, admitted, decoding, seconds)
            self.last_step = stats
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # a metrics bug must not stop generation
                log.exception("step listener failed")

    def _step_stats(self, results, admitted, decoding, seconds) -> StepStats:
        n_moe = len(results[0].routed_counts) if results else 0
        for r in results:
            self.token_class_load.add(r.class_counts)
        if len(results) == 1:   # EP = 1: no per-expert sums (256 calls a step at 2 MoE layers, issue 21)
            experts = [list(counts) for counts in results[0].routed_counts]
        else:
            experts = [[sum(col) for col in zip(*(r.routed_counts[layer] for r in results))] for layer in range(n_moe)]
        phases: dict[str, float] = {}
        for r in results:
            for k, v in r.phase_seconds.items():
                phases[k] = max(phases.get(k, 0.0), v)
        return StepStats(step=self.step_count, seconds=seconds, num_seqs=sum(len(t.tokens) for t in results),
                         num_tokens=sum(r.num_tokens for r in results), admitted=admitted,
                         joined_running_batch=admitted > 0 and decoding > 0, expert_counts=experts,
                         rank_received=[r.received for r in results], rank_tokens=[r.num_tokens for r in results],
                         a2a_seconds=[r.a2a_seconds for r in results], a2a_bytes=[r.a2a_bytes for r in results],
                         phase_seconds=phases,
                         rank_expert_seconds=[r.phase_seconds.get("experts", 0.0) for r in results],
                         prefill_tokens=self.scheduler.prefill_tokens_last_step,
                         decodes=self.scheduler.decodes_last_step)

    def _on_token(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        if req.state.done:
            return
        self.scheduler.first_token(req)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        p = req.params
        if req.text is None and self.tokenizer is not None:  # incremental detokenizer + stop strings
            req.text = TextOutput(self.tokenizer.decode, p.stop)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.stop_ids):
            self._finish(req, "stop", tail=self._text_tail(req))  # text held back (partial character or stop)
            return
        req.output_ids.append(token)
        delta, stopped = req.text.add(req.output_ids, len(req.output_ids) >= p.min_tokens) \
            if req.text is not None else ("", False)
        self._emit(req, token, delta, logprobs)
        if stopped:
            self._finish(req, "stop")
        elif len(req.output_ids) >= p.max_tokens:
            self._finish(req, "length", tail=self._text_tail(req))

    @staticmethod
    def _text_tail(req: Request) -> str:
        return req.text.tail(req.output_ids) if req.text is not None else ""

    def _emit(self, req: Request, token: int | None, text: str, logprobs: TokenLogprobs | None = None) -> None:
        req.stream.put(TokenEvent(req.request_id, token, text, logprobs=logprobs, prompt_tokens=len(req.prompt_ids),
                                  completion_tokens=len(req.output_ids), cached_tokens=req.cached_prompt_tokens or 0))

    def _finish(self, req: Request, reason: str, error: str | None = None, tail: str = "") -> None:
        """Ends a request: frees its KV pages and sends the final event, carrying `tail` (text held
        back for a stop string that never completed)."""
        if req.state.done:
            return
        self.scheduler.finish(req, aborted=reason == "abort")
        self.finished[reason] = self.finished.get(reason, 0) + 1
        now = time.monotonic()
        for fn in self._finish_listeners:
            try:
                fn(req, reason, now)
            except Exception:  # a metrics bug must not stop generation
                log.exception("finish listener failed")
        self._requests.pop(req.request_id, None)
        req.stream.put(TokenEvent(req.request_id, None, tail, finished=True, finish_reason=reason, error=error,
                                  prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                                  cached_tokens=req.cached_prompt_tokens or 0))

    def _mark_unhealthy(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.error("engine step failed; engine is now unhealthy: %s", self.error)
        self._fail_all(f"engine failed: {self.error}")

    def _fail_all(self, message: str) -> None:
        with self._cv:
            for req in list(self._requests.values()):
                self._finish(req, "error", error=message)
