"""Live expert rebalancing (EPLB) driven from the engine loop, between steps.

1. A routing window over the last `eplb_window_steps` steps measures the imbalance (busiest rank
   over the mean, summed over MoE layers: parallel/eplb.imbalance).
2. When parallel/eplb.RebalanceTrigger says so (or `request()` asks), the policy
   (parallel/eplb.rebalance) computes a placement from the window's per-expert load, with
   minimal movement. An unchanged placement ends there.
3. Every rank stages its slot weights for it on a thread of its own (RankWorker.stage_placement,
   engine/expert_swap.py) while steps go on; the loop polls (`POLL_S`) until all are ready.
4. Between two steps: RayRanks.placement becomes the new placement (replacement ranks load it
   from then on), then every rank swaps (RankWorker.swap_placement) in one call, so all route
   by it from the same step on. The pause is that one call: pointer swaps and a routing table.

A rank failure at any point goes to the engine's recovery; `resync()` afterwards drops a staged
rebalance and makes every rank hold RayRanks.placement (a survivor that missed the swap does it
then, staging on the spot).
"""

from __future__ import annotations

import logging
import time

from ..metrics import RoutingWindow
from ..parallel.eplb import RebalanceTrigger, imbalance, rebalance
from ..parallel.expert_load import load_of_window

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the loop asks the ranks whether their staging is done


class LiveRebalancer:
    def __init__(self, engine, window_steps: int, interval_steps: int, min_imbalance: float):
        self.engine = engine
        self.window = RoutingWindow(window_steps)
        self.trigger = RebalanceTrigger(min_imbalance=min_imbalance, interval_steps=interval_steps)
        self.pending = None            # the placement being staged
        self._asked = False            # request(): rebalance at the next step whatever the trigger says
        self._extra = None             # request(window_step): one step's counts to add to the window first
        self._started = 0.0
        self._last_poll = 0.0
        self._next_check = 0           # the first step at which the window's imbalance is computed again
        self.stats = {"imbalance": None, "rebalances": 0, "moved_slots": 0, "moved_bytes": 0, "skipped": 0, "failed": 0, "staging": False,
                      "last_imbalance_before": None, "last_imbalance_planned": None, "last_staged_bytes": 0,
                      "last_seconds": None, "last_swap_seconds": None, "last_error": None}
        engine.add_step_listener(lambda s: self.window.add(s.expert_counts, s.rank_received))

    def request(self, window_step: tuple | None = None) -> None:
        """Rebalance from the current window at the next step (an operator's or a test's ask).
        window_step: (expert_counts, rank_received) of one step the loop adds to the window
        first (a load to plan for; the window belongs to the loop's thread)."""
        self._extra = window_step
        self._asked = True

    @property
    def busy(self) -> bool:
        """A rebalance is staging, or asked for with a window to plan from: the engine loop, when
        idle, keeps calling after_step (every POLL_S), so it completes without traffic too."""
        return self.pending is not None or (self._asked and bool(self.window.steps or self._extra))

    def measured(self) -> float:
        """The window's imbalance now (call on the engine loop's thread, which feeds the window)."""
        return imbalance(self.window.summary()["rank_load"])

    def after_step(self, step: int) -> None:
        """Called by the engine loop after each step, and on idle heartbeats while `busy`; rank
        errors propagate (the loop recovers)."""
        if self.pending is not None:
            if time.monotonic() - self._last_poll >= POLL_S:
                self._poll()
            return
        if self._asked and self._extra is not None:
            self.window.add(*self._extra)
            self._extra = None
        if not self.window.steps or not (self._asked or step >= self._next_check):
            return
        measured = self.stats["imbalance"] = self.measured()   # O(window): only when a rebalance may be due
        if self._asked or self.trigger.due(step, measured):
            self._asked = False
            self.trigger.last_step = step
            self._next_check = step + self.trigger.interval_steps
            self._propose(measured)
        else:   # balanced enough, or too soon: look again a tenth of a window later
            self._next_check = step + max(1, min(self.window.steps.maxlen // 10,
                                                 self.trigger.last_step + self.trigger.interval_steps - step))

    def _propose(self, measured: float) -> None:
        ranks = self.engine.ranks
        load = load_of_window(self.window, self.engine.model_config.text.moe_layers).per_expert()
        nodes = [i.get("node_id") for i in ranks.infos]
        current = ranks.placement
        new = rebalance(load, current, nodes if len(set(nodes)) > 1 and None not in nodes else None)
        if new == current:
            self.stats["skipped"] += 1
            return
        self.stats.update(last_imbalance_before=measured, last_error=None,
                          last_imbalance_planned=_planned(new, load, measured, current))
        log.info("expert rebalance: imbalance %.2f measured; staging a placement that moves %d slot(s)",
                 measured, _moved(current, new))
        self.pending, self._started, self._last_poll = new, time.monotonic(), time.monotonic()
        self.stats["staging"] = True
        ranks.call("stage_placement", new)

    def _poll(self) -> None:
        ranks = self.engine.ranks
        self._last_poll = time.monotonic()
        status = ranks.call("staging_status")
        failed = [s.get("error") or "a rank lost its staged weights" for s in status if s["state"] in ("failed", "none")]
        if failed:
            log.warning("expert rebalance dropped: a rank could not stage it (%s)", failed[0])
            self.stats.update(failed=self.stats["failed"] + 1, last_error=failed[0])
            self._drop()
            return
        if any(s["state"] != "ready" for s in status):
            return
        new, old = self.pending, ranks.placement
        t0 = time.monotonic()
        ranks.placement = new            # from here on a replacement rank loads the new placement
        self.pending = None
        self.stats["staging"] = False
        ranks.call("swap_placement", new)
        for r, info in enumerate(ranks.infos):
            info["experts"] = list(new.experts_of(r))
        self.window.steps.clear()        # the old placement's rank loads say nothing about the new one
        moved = _moved(old, new)
        self.stats.update(rebalances=self.stats["rebalances"] + 1, moved_slots=self.stats["moved_slots"] + moved,
                          moved_bytes=self.stats["moved_bytes"] + sum(s["moved_bytes"] for s in status),
                          last_staged_bytes=max(s["nbytes"] for s in status),
                          last_swap_seconds=time.monotonic() - t0, last_seconds=time.monotonic() - self._started)
        log.info("expert rebalance done: %d slot(s) moved in %.2f s (swap %.1f ms, staged %.1f MB per rank at most)",
                 moved, self.stats["last_seconds"], 1e3 * self.stats["last_swap_seconds"],
                 self.stats["last_staged_bytes"] / 1e6)

    def _drop(self) -> None:
        self.pending = None
        self.stats["staging"] = False
        self.engine.ranks.call("drop_staged")

    def resync(self) -> None:
        """After a recovery: no staged rebalance survives, and every rank holds RayRanks.placement."""
        if self.pending is not None:
            self.pending = None
            self.stats["staging"] = False
        self.engine.ranks.call("swap_placement", self.engine.ranks.placement)


def _moved(old, new) -> int:
    """Slots whose expert changed."""
    return sum(a != b for ro, rn in zip(old.slots, new.slots) for a, b in zip(ro, rn))


def _planned(new, load, measured: float, current) -> float:
    """The imbalance the new placement should give, scaled from the measured one by the policy's
    own estimate (max rank load under each placement for this load)."""
    before, after = max(current.rank_loads(load)), max(new.rank_loads(load))
    return measured * after / before if before else measured
