"""Every maverick-ray metric, defined in one place, plus the routing-balance window.

Metrics use `ray.util.metrics`, so each Ray node exports them on its metrics export port
(8080 in `maverick-ray serve` and the KubeRay manifests) with Ray's `ray_` prefix, e.g.
`ray_maverick_balancedness{layer="1", replica="..."}`. Units are in the names.

Balancedness of a MoE layer over the window = mean over ranks / max over ranks of the tokens
their experts received (1.0 = perfectly even, 1/EP = one rank gets everything).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

EXPERT_SERIES_MODES = ("on", "off", "summary")
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
RECOVERY_BUCKETS = [1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]  # a new rank group: seconds to 10 minutes
PREFILL_BUCKETS = [1, 16, 64, 256, 1024, 4096, 16384]  # prompt tokens in one step (chunked prefill)


class RoutingWindow:
    """Sliding window of per-step routing counts: expert load, rank load, balance figures."""

    def __init__(self, steps: int = 64):
        self.steps: deque = deque(maxlen=steps)

    def add(self, expert_counts: list[list[int]], rank_received: list[list[int]]) -> None:
        """expert_counts[layer][expert], rank_received[rank][layer] for one step."""
        if expert_counts:
            self.steps.append((expert_counts, rank_received))

    def summary(self) -> dict:
        if not self.steps:
            return {"layers": 0, "expert_load": [], "rank_load": [], "balancedness": [], "imbalance": [],
                    "idle_fraction": [], "window_steps": 0}
        n_layers = len(self.steps[0][0])
        n_experts = len(self.steps[0][0][0]) if n_layers else 0
        n_ranks = len(self.steps[0][1])
        experts = [[0] * n_experts for _ in range(n_layers)]
        ranks = [[0] * n_ranks for _ in range(n_layers)]
        for counts, received in self.steps:
            for layer in range(n_layers):
                for e, c in enumerate(counts[layer]):
                    experts[layer][e] += c
                for r in range(n_ranks):
                    ranks[layer][r] += received[r][layer]
        bal, imb, idle = [], [], []
        for layer in range(n_layers):
            load = ranks[layer]
            top, mean = max(load), sum(load) / len(load)
            bal.append(mean / top if top else 1.0)
            imb.append(top / mean if mean else 1.0)
            idle.append(sum(1 for c in experts[layer] if c == 0) / max(n_experts, 1))
        return {"layers": n_layers, "expert_load": experts, "rank_load": ranks, "balancedness": bal,
                "imbalance": imb, "idle_fraction": idle, "window_steps": len(self.steps)}


@dataclass
class _Defs:
    expert_tokens: object
    expert_load_max: object
    expert_load_min: object
    rank_tokens: object
    balancedness: object
    imbalance: object
    idle_fraction: object
    a2a_seconds: object
    a2a_bytes: object
    step_seconds: object
    requests: object
    ttft: object
    tpot: object
    latency: object
    prompt_tokens: object
    generation_tokens: object
    running: object
    waiting: object
    kv_usage: object
    rank_failures: object
    recoveries: object
    recovery_seconds: object
    replayed: object
    recovering: object
    preemptions: object
    kv_pages: object
    kv_bytes: object
    prefix_queried: object
    prefix_hit: object
    prefill_tokens: object
    prefill_budget: object
    eplb_rebalances: object
    eplb_moved_slots: object
    eplb_staged_bytes: object
    eplb_seconds: object
    eplb_moved_bytes: object
    eplb_imbalance: object
    expert_replicas: object


def _define() -> _Defs:
    from ray.util.metrics import Counter, Gauge, Histogram

    r = ("replica",)
    return _Defs(
        expert_tokens=Counter("maverick_expert_tokens_total", "Tokens routed to each expert of each MoE layer.",
                              tag_keys=r + ("layer", "expert")),
        expert_load_max=Gauge("maverick_expert_load_max_tokens", "Most tokens any one expert got in the window.",
                              tag_keys=r + ("layer",)),
        expert_load_min=Gauge("maverick_expert_load_min_tokens", "Fewest tokens any one expert got in the window.",
                              tag_keys=r + ("layer",)),
        rank_tokens=Counter("maverick_rank_tokens_total", "Tokens received by each EP rank's experts per MoE layer.",
                            tag_keys=r + ("layer", "rank")),
        balancedness=Gauge("maverick_balancedness_ratio",
                           "Mean over ranks / max over ranks of tokens received, per layer, over the window.",
                           tag_keys=r + ("layer",)),
        imbalance=Gauge("maverick_imbalance_ratio", "Max over ranks / mean over ranks of tokens received.",
                        tag_keys=r + ("layer",)),
        idle_fraction=Gauge("maverick_idle_experts_ratio", "Fraction of experts that got no token in the window.",
                            tag_keys=r + ("layer",)),
        a2a_seconds=Histogram("maverick_all_to_all_seconds", "All-to-all time per step (slowest rank).",
                              boundaries=STEP_BUCKETS, tag_keys=r),
        a2a_bytes=Counter("maverick_all_to_all_bytes_total", "Bytes sent through the all-to-all.", tag_keys=r),
        step_seconds=Histogram("maverick_step_seconds", "Engine step time.", boundaries=STEP_BUCKETS, tag_keys=r),
        requests=Counter("maverick_requests_total", "Finished requests by status.", tag_keys=r + ("status",)),
        ttft=Histogram("maverick_time_to_first_token_seconds", "Time to first token.",
                       boundaries=LATENCY_BUCKETS, tag_keys=r),
        tpot=Histogram("maverick_time_per_output_token_seconds", "Time per output token after the first.",
                       boundaries=STEP_BUCKETS, tag_keys=r),
        latency=Histogram("maverick_request_latency_seconds", "End-to-end request latency.",
                          boundaries=LATENCY_BUCKETS, tag_keys=r),
        prompt_tokens=Counter("maverick_prompt_tokens_total", "Prompt tokens processed.", tag_keys=r),
        generation_tokens=Counter("maverick_generation_tokens_total", "Tokens generated.", tag_keys=r),
        running=Gauge("maverick_running_sequences", "Sequences generating.", tag_keys=r),
        waiting=Gauge("maverick_waiting_sequences", "Requests waiting for a KV cache slot.", tag_keys=r),
        kv_usage=Gauge("maverick_kv_cache_usage_ratio", "Fraction of KV cache pages in use.", tag_keys=r),
        rank_failures=Counter("maverick_rank_failures_total", "Rank failures by cause: died, hung or raised.",
                              tag_keys=r + ("cause",)),
        recoveries=Counter("maverick_recoveries_total", "Restarts of the rank group after a failure, by outcome.",
                           tag_keys=r + ("outcome",)),
        recovery_seconds=Histogram("maverick_recovery_seconds", "Time from a rank failure to a working new rank group.",
                                   boundaries=RECOVERY_BUCKETS, tag_keys=r),
        replayed=Counter("maverick_replayed_sequences_total",
                         "Sequences requeued to prefill prompt + produced tokens again on new ranks.", tag_keys=r),
        recovering=Gauge("maverick_recovery_in_progress", "1 while the engine replaces its ranks after a failure.",
                         tag_keys=r),
        kv_pages=Gauge("maverick_kv_cache_pages", "KV cache pages (blocks) of all ranks, by state: used or free.",
                       tag_keys=r + ("state",)),
        kv_bytes=Gauge("maverick_kv_cache_bytes", "KV cache bytes of all ranks, by state: used or free.",
                       tag_keys=r + ("state",)),
        preemptions=Counter("maverick_preemptions_total",
                            "Sequences preempted when KV pages ran out (prefilled again later).", tag_keys=r),
        prefix_queried=Counter("maverick_prefix_cache_queried_tokens_total",
                               "Prompt tokens looked up in the prefix cache at admission.", tag_keys=r),
        prefix_hit=Counter("maverick_prefix_cache_hit_tokens_total",
                           "Prompt tokens found in the prefix cache (not prefilled again).", tag_keys=r),
        prefill_tokens=Histogram("maverick_prefill_tokens_per_step", "Prompt tokens prefilled in one step.",
                                 boundaries=PREFILL_BUCKETS, tag_keys=r),
        prefill_budget=Gauge("maverick_prefill_budget_tokens",
                             "Prompt tokens a rank may prefill in the next step: max_prefill_tokens, or fewer "
                             "while the prefill pacer keeps decoding streams within max_decode_slowdown.",
                             tag_keys=r),
        eplb_rebalances=Counter("maverick_eplb_rebalances_total",
                                "Live expert rebalances, by outcome: done, or failed (could not be staged).",
                                tag_keys=r + ("outcome",)),
        eplb_moved_slots=Counter("maverick_eplb_moved_slots_total",
                                 "Expert slots that changed expert in live rebalances.", tag_keys=r),
        eplb_staged_bytes=Gauge("maverick_eplb_staged_bytes",
                                "Extra memory the last live rebalance staged on its busiest rank (freed at the swap).",
                                tag_keys=r),
        eplb_seconds=Histogram("maverick_eplb_rebalance_seconds",
                               "A live rebalance from its decision to the swap (staging runs beside the steps).",
                               boundaries=RECOVERY_BUCKETS, tag_keys=r),
        eplb_moved_bytes=Counter("maverick_eplb_moved_bytes_total",
                                 "Expert weight bytes read into new slots by live rebalances (all ranks).", tag_keys=r),
        eplb_imbalance=Gauge("maverick_eplb_imbalance_ratio",
                             "The last live rebalance's imbalance (busiest rank over the mean, all MoE layers): "
                             "measured before it, and planned after it.", tag_keys=r + ("when",)),
        expert_replicas=Gauge("maverick_expert_replicas", "Physical slots (copies) each expert has over the ranks.",
                              tag_keys=r + ("expert",)),
    )


class EngineMetrics:
    """Feeds the engine's step statistics and request outcomes into the metrics and the window."""

    def __init__(self, engine, replica: str, expert_series: str = "on", window_steps: int = 64):
        if expert_series not in EXPERT_SERIES_MODES:
            raise ValueError(f"expert_series must be one of {EXPERT_SERIES_MODES}, got {expert_series!r}")
        self.engine, self.tags, self.mode = engine, {"replica": replica}, expert_series
        self.window = RoutingWindow(window_steps)
        self.m = _define()
        self.moe_layers = list(engine.model_config.text.moe_layers)
        engine.add_step_listener(self.on_step)
        engine.add_finish_listener(self.on_finish)
        self.last_failure_cause: str | None = None
        self._totals: dict[str, int] = {}  # engine counters already exported (preemptions, prefix cache)
        self.m.recovering.set(0.0, tags=self.tags)
        engine.add_recovery_listener(self.on_recovery)

    def on_step(self, s) -> None:
        m, t = self.m, self.tags
        self.window.add(s.expert_counts, s.rank_received)
        for i, layer in enumerate(self.moe_layers[:len(s.expert_counts)]):
            lt = dict(t, layer=str(layer))
            if self.mode == "on":
                for e, c in enumerate(s.expert_counts[i]):
                    if c:
                        m.expert_tokens.inc(c, tags=dict(lt, expert=str(e)))
            for r, rec in enumerate(s.rank_received):
                if rec[i]:
                    m.rank_tokens.inc(rec[i], tags=dict(lt, rank=str(r)))
        summary = self.window.summary()
        for i, layer in enumerate(self.moe_layers[:summary["layers"]]):
            lt = dict(t, layer=str(layer))
            m.balancedness.set(summary["balancedness"][i], tags=lt)
            m.imbalance.set(summary["imbalance"][i], tags=lt)
            m.idle_fraction.set(summary["idle_fraction"][i], tags=lt)
            if self.mode == "summary":
                m.expert_load_max.set(max(summary["expert_load"][i]), tags=lt)
                m.expert_load_min.set(min(summary["expert_load"][i]), tags=lt)
        if s.a2a_seconds:
            m.a2a_seconds.observe(max(s.a2a_seconds), tags=t)
            if sum(s.a2a_bytes):
                m.a2a_bytes.inc(sum(s.a2a_bytes), tags=t)
        m.step_seconds.observe(s.seconds, tags=t)
        st = self.engine.stats()
        m.running.set(st["running"], tags=t)
        m.waiting.set(st["waiting"], tags=t)
        m.kv_usage.set(st["kv_pages_used"] / max(st["kv_pages_total"], 1), tags=t)
        for state, pages in (("used", st["kv_pages_used"]), ("free", st["kv_pages_total"] - st["kv_pages_used"])):
            m.kv_pages.set(pages, tags=dict(t, state=state))
            m.kv_bytes.set(pages * st["kv_page_bytes"], tags=dict(t, state=state))
        m.prefill_tokens.observe(st["prefill_tokens_last_step"], tags=t)
        m.prefill_budget.set(st["prefill_budget"], tags=t)
        for name, key in (("preemptions", "preemptions"), ("prefix_queried", "prefix_cache_queried_tokens"),
                          ("prefix_hit", "prefix_cache_hit_tokens")):  # engine totals -> counter increments
            new = st[key] - self._totals.get(key, 0)
            if new > 0:
                getattr(m, name).inc(new, tags=t)
            self._totals[key] = st[key]
        if not self._totals.get("replicas_set"):
            self._replicas()
        if st.get("eplb"):
            self._eplb(st["eplb"])

    def _eplb(self, e: dict) -> None:
        """Live rebalancer totals (engine stats "eplb") -> counter increments and the staged-bytes gauge."""
        m, t = self.m, self.tags
        done_before = self._totals.get("eplb_rebalances", 0)
        for key, metric, tags in (("rebalances", m.eplb_rebalances, dict(t, outcome="done")),
                                  ("failed", m.eplb_rebalances, dict(t, outcome="failed")),
                                  ("moved_slots", m.eplb_moved_slots, t), ("moved_bytes", m.eplb_moved_bytes, t)):
            new = e[key] - self._totals.get("eplb_" + key, 0)
            if new > 0:
                metric.inc(new, tags=tags)
            self._totals["eplb_" + key] = e[key]
        m.eplb_staged_bytes.set(e["last_staged_bytes"], tags=t)
        if e["rebalances"] > done_before:
            m.eplb_seconds.observe(e["last_seconds"], tags=t)
            m.eplb_imbalance.set(e["last_imbalance_before"], tags=dict(t, when="before"))
            m.eplb_imbalance.set(e["last_imbalance_planned"], tags=dict(t, when="planned"))
            self._replicas()

    def _replicas(self) -> None:
        """Copies per expert of the placement served now (at the first step and after each rebalance)."""
        placement = self.placement()
        for expert, n in enumerate(placement["replicas"] if placement else []):
            self.m.expert_replicas.set(n, tags=dict(self.tags, expert=str(expert)))
        self._totals["replicas_set"] = 1

    def on_finish(self, req, reason: str, now: float) -> None:
        m, t = self.m, self.tags
        m.requests.inc(1, tags=dict(t, status=reason))
        m.prompt_tokens.inc(len(req.prompt_ids), tags=t)
        if req.output_ids:
            m.generation_tokens.inc(len(req.output_ids), tags=t)
        if req.first_token_time is not None:
            m.ttft.observe(req.first_token_time - req.arrival, tags=t)
            if len(req.output_ids) > 1:
                m.tpot.observe((now - req.first_token_time) / (len(req.output_ids) - 1), tags=t)
        m.latency.observe(now - req.arrival, tags=t)

    def on_recovery(self, cause: str, outcome: str | None, seconds: float | None, replayed: int) -> None:
        """A rank failure (outcome None; a recovery follows unless max_recoveries is 0), or the end
        of one recovery attempt ("ok" or "failed": the engine retries)."""
        m, t = self.m, self.tags
        if outcome is None:
            self.last_failure_cause = cause
            m.rank_failures.inc(1, tags=dict(t, cause=cause))
            m.recovering.set(1.0 if self.engine.engine_cfg.max_recoveries else 0.0, tags=t)
            return
        m.recoveries.inc(1, tags=dict(t, outcome=outcome))
        if replayed:
            m.replayed.inc(replayed, tags=t)
        if outcome == "ok":
            m.recovery_seconds.observe(seconds, tags=t)
            m.recovering.set(0.0, tags=t)

    def expert_load(self) -> dict:
        out = self.window.summary()
        out.update({"moe_layers": self.moe_layers[:out["layers"]], "ep_size": self.engine.parallel.ep_size,
                    "num_experts": self.engine.model_config.text.num_local_experts, "stats": self.engine.stats(),
                    "last_failure_cause": self.last_failure_cause, "placement": self.placement(),
                    "by_token_class": self._by_token_class()})
        return out

    def _by_token_class(self) -> dict | None:
        load = getattr(self.engine, "token_class_load", None)   # engine/token_classes.py
        return load.summary() if load is not None else None

    def placement(self) -> dict | None:
        """The physical slots each rank holds (expert per slot) and the replicas of each expert."""
        p = getattr(self.engine.ranks, "placement", None)
        if p is None:
            return None
        return {"slots": [list(r) for r in p.slots], "replicas": p.replica_counts()}
