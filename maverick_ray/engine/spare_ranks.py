"""Pre-started spare rank processes: what replaces a failed rank without a Ray worker start.

Starting a rank actor costs a new worker process, Ray's own start-up in it and the imports of
torch, DeepSpeed and the model code: 3-4 s of a 5 s recovery on a CPU host (BENCHMARKS.md). A
spare is a rank actor started ahead of time on each node that holds ranks, with those imports
done, holding no Ray resources (num_cpus = num_gpus = 0) and no weights. Recovery hands a failed
rank's place to a spare on the same node (it then loads that rank's weights and joins the new
group like a fresh actor would) and starts a new spare in the background.

A spare takes the failed rank's GPUs by their ids (the failed actor's `ray.get_gpu_ids()`):
Ray assigned no GPU to the spare, so it sets CUDA_VISIBLE_DEVICES itself before CUDA starts.
Ray's accounting still sees the failed rank's bundle as holding those GPUs, which is what keeps
anything else off them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

SPARE_PROBE_S = 2.0  # a spare that does not answer within this is dropped, not used
# A recovery's new spares start this long after it: a spare's start (a process importing torch
# and DeepSpeed, seconds of CPU) would otherwise compete with the replay of the lost sequences
# on the same cores (it doubled the re-prefill on a 2-core host; BENCHMARKS.md).
REFILL_DELAY_S = 10.0


class SparePool:
    """Up to `per_node` warm spare actors on each node that holds ranks. `new_actor(node_id)`
    starts an actor on that node (one that has `warm(gpu)` and `probe()`); gpu: the ranks use GPUs."""

    def __init__(self, new_actor: Callable[[str], Any], per_node: int, gpu: bool = False):
        self.new_actor, self.per_node, self.gpu = new_actor, per_node, gpu
        self._spares: dict[str, list[tuple[Any, Any]]] = {}   # node id -> [(actor, ref of its warm())]
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._done: set = set()   # warm() refs known to be ready (see _warmed)

    def fill(self, nodes: list[str]) -> None:
        """Starts spares (without waiting for them) until each of `nodes` has per_node."""
        with self._lock:
            if self._closed:
                return
            for node in dict.fromkeys(n for n in nodes if n):
                have = self._spares.setdefault(node, [])
                while len(have) < self.per_node:
                    actor = self.new_actor(node)
                    have.append((actor, actor.warm.remote(self.gpu)))

    def fill_later(self, nodes: list[str], delay: float = REFILL_DELAY_S) -> None:
        """fill(nodes) after `delay` seconds, on a timer thread (after a recovery: see REFILL_DELAY_S)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(delay, self._fill_quietly, args=(list(nodes),))
            self._timer.daemon = True
            self._timer.start()

    def _fill_quietly(self, nodes: list[str]) -> None:
        try:
            self.fill(nodes)
        except Exception as e:  # Ray going away under us: the next recovery starts fresh actors
            log.warning("could not start spare rank processes: %s: %s", type(e).__name__, e)

    def take(self, node: str | None) -> Any | None:
        """A warm spare on `node` that answers now, removed from the pool; None when there is none
        (not started, still starting, or dead with its node)."""
        with self._lock:
            return self._take(node)

    def _take(self, node: str | None) -> Any | None:
        import ray

        have = self._spares.get(node) or []
        for i, (actor, warm) in enumerate(have):
            ready, _ = ray.wait([warm], timeout=0)
            if not ready:
                continue
            del have[i]
            try:
                ray.get(warm, timeout=0)
                ray.get(actor.probe.remote(), timeout=SPARE_PROBE_S)
            except Exception as e:  # died since it warmed up (its node went away, OOM)
                log.warning("spare rank process on node %s is unusable (%s); starting a fresh one",
                            node, type(e).__name__)
                _kill(actor)
                return None
            return actor
        return None

    def _warmed(self, timeout: float = 0.0) -> list:
        """The warm() refs of the spares that have finished warming up, waiting up to `timeout` s
        for the others (0: only asking). A ref once ready stays ready, so Ray is asked only about
        the others (engine stats call this every step)."""
        import ray

        with self._lock:
            refs = [warm for have in self._spares.values() for _, warm in have]
        pending = [r for r in refs if r not in self._done]
        if pending:
            self._done.update(ray.wait(pending, num_returns=len(pending), timeout=timeout)[0])
        return [r for r in refs if r in self._done]

    def wait_warm(self, timeout: float) -> bool:
        """Waits up to `timeout` s for every spare started so far to finish warming up (a spare
        whose warm-up failed counts as finished: `take` drops it). True when all have."""
        with self._lock:
            started = sum(len(have) for have in self._spares.values())
        return len(self._warmed(timeout)) >= started

    def ready(self) -> int:
        """How many spares have finished warming up (not probed)."""
        return len(self._warmed())

    def warm_info(self) -> list[dict]:
        """What each warmed-up spare reported ({pid, node_id})."""
        import ray

        ready = self._warmed()
        return ray.get(ready) if ready else []

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            for have in self._spares.values():
                for actor, _ in have:
                    _kill(actor)
            self._spares = {}


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # already dead
        pass
