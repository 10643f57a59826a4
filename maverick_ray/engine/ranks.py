"""The set of rank workers an engine steps in lockstep: in-process (EP = 1) or Ray actors.

Ray actors live in a placement group whose bundles and strategy come from ParallelConfig
(SPREAD/STRICT_SPREAD across nodes, PACK on one). Inside a Serve replica that was given
`placement_group_bundles`, the workers take the replica's bundles 1..EP instead. Rank 0
picks the rendezvous address (its node IP and a free port); all ranks then form the
torch.distributed group through deepspeed.init_distributed. Each step's plans and results go
over a direct socket to every rank (engine/step_channel.py); Ray carries everything else.
"""

from __future__ import annotations

import gc
import logging
import socket
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..config import EngineConfig, ParallelConfig
from ..parallel.network import pin_collective_interface
from ..parallel.placement import ExpertPlacement
from .spare_ranks import SparePool
from .step_channel import RankFailed, StepClient, StepServer, StepTimeout, new_token
from .step_types import RankPlan, RankResult
from .worker import RankWorker

log = logging.getLogger(__name__)


class ComputeThread:
    """Runs every call on one dedicated thread.

    A rank's model is built, stepped and called on one thread. On CPU every thread that runs
    torch compute gets its own OpenMP team, and once a process holds more OpenMP threads than
    cores, libgomp sleeps between parallel regions instead of spinning: a decode step built on
    one thread and stepped on another (or beside another computing thread) ran about 3x slower
    (BENCHMARKS.md). One thread per rank keeps one team.
    """

    def __init__(self, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def submit(self, fn, *args):
        """Queues fn(*args) on the thread; returns its concurrent.futures.Future."""
        return self._pool.submit(fn, *args)

    def run(self, fn, *args):
        return self.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


CALL_TIMEOUT_S = 120.0  # RankGroup.call: a rank method that takes longer is reported as hung
PROBE_TIMEOUT_S = 3.0  # recovery: a rank that does not answer a probe within this has failed
SURVIVOR_RELEASE_S = 15.0  # recovery: a survivor whose failed step has not ended by then is replaced
# Start waits this long for the spare rank processes to finish their imports: a spare warming up
# beside the first requests took a core from the ranks and halved EP=2 decode on a 2-core host
# for its first seconds (BENCHMARKS.md). Past it the engine serves anyway.
SPARE_START_WAIT_S = 60.0


class RankGroup(Protocol):
    """The ranks an engine steps in lockstep. LocalRanks (EP = 1, in-process) and RayRanks
    (Ray actors) implement it with the same semantics, which the engine relies on."""

    placement: ExpertPlacement | None
    kv_pages: int | None       # KV cache pages of every rank (set by start; replacements get the same)
    infos: list[dict]          # what each rank reported at start (rank, node, experts, collectives, ...)
    start_seconds: dict[str, float]  # where the last start or restart went (kill, actor_start, weight_load, ...)

    def start(self, num_experts: int) -> None:
        """Builds every rank (weights, KV cache, collective group); returns when all are ready."""

    def step(self, plans: list[RankPlan], timeout: float) -> list[RankResult]:
        """Runs one step, plans[r] on rank r; returns the results in rank order. Raises RankFailed
        when a rank raises or its process dies, TimeoutError when some rank has not finished
        within `timeout` s (the rank may still be running: the group is then unusable)."""

    def call(self, method: str, *args, timeout: float = CALL_TIMEOUT_S) -> list:
        """Calls RankWorker.method(*args) on every rank between steps; results in rank order.
        TimeoutError after `timeout` s."""

    def check_alive(self, timeout: float) -> None:
        """Between steps: raises RankFailed for a rank whose process has died, TimeoutError for
        one that does not answer within `timeout` s. Cheap enough to call every second."""

    def recover(self, failure: Exception | None, timeout: float) -> list[int]:
        """After `failure` (what step or check_alive raised): replaces the ranks that failed
        with fresh ones (weights loaded, KV caches empty) and forms a new collective group in
        which the old ones can no longer take part. Ranks that did not fail keep their weights,
        KV caches and sampling state. Returns the replaced ranks: their sequences must be
        replayed. Raises when a new rank cannot start within `timeout` s; the next call then
        replaces every rank."""

    def submit_host_work(self, fn: Callable, *args) -> Future:
        """Runs host-side torch work (image preprocessing) where it does not slow the ranks."""

    def shutdown(self) -> None:
        """Stops every rank and frees its resources. Safe to call twice."""


def release_frames(error: BaseException | None) -> None:
    """Drops the local variables held by the tracebacks of `error` and the errors it chains
    (a failed step's frames reference the worker, so its model and KV cache would outlive it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def free_device_memory() -> None:
    """Collects what was just dropped and returns cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class LocalRanks:
    """A single in-process rank (EP = 1, no Ray), computing on its own ComputeThread."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, progress: bool = False):
        self.placement = None
        self.worker = None
        self.infos: list[dict] = []
        self.start_seconds: dict[str, float] = {}
        self._args = (checkpoint, engine, progress)
        self._compute: ComputeThread | None = None
        self.kv_pages: int | None = None

    def start(self, num_experts: int) -> None:
        checkpoint, engine, progress = self._args
        self.placement = ExpertPlacement.contiguous(num_experts, 1)
        self._compute = ComputeThread("maverick-rank0")
        self.worker = self._compute.run(RankWorker, checkpoint, 0, self.placement, engine, None, progress,
                                        self.kv_pages)
        self.infos = [self._compute.run(self.worker.info)]
        self.kv_pages = self.infos[0]["kv_pages"]
        self.start_seconds = dict(self.infos[0]["start_seconds"])

    def _wait(self, future: Future, timeout: float, what: str) -> Any:
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"rank 0 did not finish {what} within {timeout:.0f}s") from None
        except Exception as e:  # the rank raised: the same error a Ray rank reports
            raise RankFailed(0, type(e).__name__, str(e)) from e

    def step(self, plans: list[RankPlan], timeout: float) -> list[RankResult]:
        return [self._wait(self._compute.submit(self.worker.step, plans[0]), timeout, "a step")]

    def call(self, method: str, *args, timeout: float = CALL_TIMEOUT_S) -> list:
        return [self._wait(self._compute.submit(getattr(self.worker, method), *args), timeout, method)]

    def check_alive(self, timeout: float) -> None:
        self._wait(self._compute.submit(lambda: None), timeout, "a heartbeat")

    def recover(self, failure: Exception | None, timeout: float) -> list[int]:
        """A new worker on a new compute thread; a hung old thread is abandoned (its late result
        goes nowhere). The only rank is always the failed one. The old worker's memory (weights,
        KV cache: most of a GPU) is freed before the new one allocates its own."""
        self.shutdown()
        release_frames(failure)
        free_device_memory()
        self.start(self.placement.num_experts)
        return [0]

    def submit_host_work(self, fn, *args):
        """Host-side torch work (image preprocessing) runs on the rank's thread, between steps:
        on another thread of this process it would start a second OpenMP team and slow every
        later step (a single image resize elsewhere doubled the decode step; BENCHMARKS.md)."""
        return self._compute.submit(fn, *args)

    def shutdown(self) -> None:
        self.worker = None
        if self._compute is not None:
            self._compute.shutdown()
            self._compute = None


def check_worker_bundles(bundles: list[dict], needed: dict) -> None:
    """Fails at once when the replica's placement-group bundles 1..EP (from the Serve config's
    `placement_group_bundles`) cannot hold an EP worker, instead of a worker that never starts."""
    for i, bundle in enumerate(bundles, start=1):
        short = {k: v for k, v in needed.items() if float(bundle.get(k, 0)) < v}
        if short:
            raise ValueError(f"placement_group_bundles[{i}] = {bundle} cannot hold an EP worker, which needs "
                             f"{needed}: fix the Serve config's placement_group_bundles (one bundle for the "
                             "replica, then one per EP worker) or the worker resources in its args")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _RankActor:
    """Ray actor body: builds a RankWorker once the group's address is known (or, as a spare,
    waits warm until a failed rank's place is handed to it)."""

    def __init__(self):
        self.worker: RankWorker | None = None
        self.gpu_ids: list = []

    def rendezvous_address(self) -> str:
        import ray

        ip = ray.util.get_node_ip_address()
        return f"tcp://{ip}:{_free_port(ip)}"

    def warm(self, gpu: bool) -> dict:
        """A spare (engine/spare_ranks.py): imports what building a rank needs, ahead of time.
        On GPU workers DeepSpeed is left for setup: its import probes CUDA, which would fix the
        visible devices before setup can hand the spare its GPUs."""
        import os

        import ray

        if not gpu:
            import deepspeed.comm  # noqa: F401  (the collective group's import, the slowest)

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def setup(self, checkpoint, rank, placement, engine, address, token, progress=False, kv_pages=None,
              gpu_ids=None):
        """Builds the rank and opens its step channel; returns the rank's info with the
        channel's address under "step_address" and the GPUs it uses under "gpu_ids".
        gpu_ids: a spare taking a failed rank's place uses that rank's GPUs (Ray gave it none)."""
        import os

        import ray

        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        ip = ray.util.get_node_ip_address()
        pin_collective_interface(ip)
        # Ray runs the methods of this threaded actor (max_concurrency=2) on a pool of threads:
        # the rank's compute goes to one thread of its own instead.
        self.compute = ComputeThread(f"maverick-rank{rank}")
        self.worker = self.compute.run(lambda: RankWorker(checkpoint, rank, placement, engine, dist_address=address,
                                                          progress=progress, kv_pages=kv_pages))
        self.channel = StepServer(ip, token, lambda plan: self.compute.run(self.worker.step, plan))
        self.gpu_ids = list(gpu_ids or ray.get_gpu_ids())
        return {**self.compute.run(self.worker.info), "step_address": self.channel.address, "gpu_ids": self.gpu_ids}

    def call(self, method, *args):
        return self.compute.run(getattr(self.worker, method), *args)

    # Recovery, called on Ray's second thread while the compute thread may still be stuck.
    def probe(self) -> dict:
        """Answers at once unless the process is stopped: whether the rank's step is waiting in
        a collective (then it is not the rank its peers wait for)."""
        return {"in_collective": self.worker is not None and self.worker.in_collective}

    def leave_group(self, timeout: float) -> None:
        """After a peer failed: stops serving the old step channel, waits up to `timeout` s for
        the failed step to end here (it does once the failed peer's process is gone: the
        all-to-all reports the peer gone) and leaves the broken group. TimeoutError when the
        step does not end (the rank is then replaced too)."""
        self.channel.close()
        self.compute.submit(lambda: None).result(timeout=timeout)
        self.compute.run(self.worker.leave_group)

    def rejoin(self, address, token):
        """A surviving rank joins the new group and opens a new step channel; returns its info."""
        import ray

        info = self.compute.run(self.worker.join_group, address)
        self.channel = StepServer(ray.util.get_node_ip_address(), token,
                                  lambda plan: self.compute.run(self.worker.step, plan))
        return {**info, "step_address": self.channel.address, "gpu_ids": self.gpu_ids}


class RayRanks:
    """EP ranks as Ray actors, one per placement-group bundle."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, parallel: ParallelConfig, progress: bool = False):
        self.checkpoint, self.engine, self.parallel, self.progress = checkpoint, engine, parallel, progress
        self.actors = []
        self.pg = None
        self.own_pg = False
        self.placement = None
        self.infos: list[dict] = []   # what each rank reported at setup (node, experts, bytes)
        self.start_seconds: dict[str, float] = {}  # where the last start or restart went
        self._host: ComputeThread | None = None  # host-side work; the ranks compute in other processes
        self._channel: StepClient | None = None  # the per-step plans and results
        self.kv_pages: int | None = None  # every rank's KV cache pages (the fewest any rank got at start)
        self.spares: SparePool | None = None  # warm processes that replace failed ranks (engine/spare_ranks.py)

    def _bundles(self):
        return [self.parallel.worker_bundle()] * self.parallel.ep_size

    def start(self, num_experts: int, ready_timeout: float = 600.0) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        from ..parallel.initial_placement import bundle_nodes, initial_placement

        p = self.parallel
        self.placement = initial_placement(p, num_experts)  # a bad map or load file fails before any actor
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= p.ep_size + 1:
            check_worker_bundles(current.bundle_specs[1:p.ep_size + 1], p.worker_bundle())
            self.pg, first = current, 1  # a Serve replica: bundle 0 is the replica itself
        else:
            self.pg = placement_group(self._bundles(), strategy=p.placement_strategy)
            self.own_pg, first = True, 0
            try:
                ray.get(self.pg.ready(), timeout=ready_timeout)
            except ray.exceptions.GetTimeoutError:
                ray.util.remove_placement_group(self.pg)
                raise RuntimeError(
                    f"the cluster cannot place {p.ep_size} workers of {self._bundles()[0]} with strategy "
                    f"{p.placement_strategy} within {ready_timeout:.0f}s (see `ray status`)") from None
        self._first_bundle = first
        nodes = bundle_nodes(self.pg, first, p.ep_size)
        if nodes and len(set(nodes)) > 1:  # ranks on several nodes: the policy places experts node by node
            self.placement = initial_placement(p, num_experts, nodes)
        if p.spare_ranks:   # started beside the ranks, so their imports overlap the ranks' own start
            self.spares = SparePool(self._new_spare, p.spare_ranks, gpu=bool(p.num_gpus_per_worker))
            self.spares.fill(nodes or [])
        self._launch(ready_timeout, self.progress)
        if self.spares is not None:
            self.spares.fill([i["node_id"] for i in self.infos])   # nodes Ray did not name before the launch
            t0 = time.perf_counter()
            if not self.spares.wait_warm(SPARE_START_WAIT_S):
                log.warning("spare rank processes still warming up after %.0f s; serving without waiting",
                            SPARE_START_WAIT_S)
            self.start_seconds["spares"] = time.perf_counter() - t0

    def _new_spare(self, node_id: str):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return ray.remote(_RankActor).options(
            num_cpus=0, num_gpus=0, max_concurrency=2,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()

    def _launch(self, timeout: float, progress: bool, replace: list[int] | None = None) -> None:
        """Starts a rank actor in its bundle for each rank in `replace` (default: every rank);
        the other ranks (survivors that have left their old group) rejoin. All of them form a
        new collective group through a fresh rendezvous (a new address and step-channel token
        each time) and the step channel is connected. On failure every actor is killed."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = self.parallel
        replace = list(range(p.ep_size)) if replace is None else sorted(replace)
        t0 = time.perf_counter()
        actor_cls = ray.remote(_RankActor)
        if not self.actors:
            self.actors = [None] * p.ep_size
        gpu_ids: dict[int, list] = {}   # ranks whose place a spare takes: the failed rank's GPUs
        for r in replace:
            spare = self.spares.take(self.infos[r]["node_id"]) if self.spares and len(self.infos) > r else None
            if spare is not None:
                self.actors[r], gpu_ids[r] = spare, self.infos[r].get("gpu_ids") or []
                continue
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                        placement_group_bundle_index=self._first_bundle + r)
            self.actors[r] = actor_cls.options(
                num_cpus=p.num_cpus_per_worker, num_gpus=p.num_gpus_per_worker,
                scheduling_strategy=strategy, max_concurrency=2).remote()
        try:
            address, *_ = ray.get([self.actors[0].rendezvous_address.remote()]
                                  + [self.actors[r].__ray_ready__.remote() for r in replace], timeout=timeout)
            t_up = time.perf_counter()
            token = new_token()
            infos = ray.get([a.setup.remote(str(self.checkpoint), r, self.placement, self.engine, address, token,
                                            progress and r == 0, self.kv_pages, gpu_ids.get(r)) if r in replace
                             else a.rejoin.remote(address, token)
                             for r, a in enumerate(self.actors)], timeout=timeout)
            self._channel = StepClient([tuple(info["step_address"]) for info in infos], token)
        except BaseException:
            self._kill_actors()
            raise
        self.infos = infos
        if self.kv_pages is None:  # replacement ranks get the group's size, whatever memory they find free
            self.kv_pages = min(i["kv_pages"] for i in infos)
        # Where the start went, the slowest rank's figures: actor start (process, imports), the
        # collective group's init, weight loading, and the rest of setup (step channel).
        ranks = [i.get("start_seconds", {}) for i in infos]
        self.start_seconds.update({"actor_start": t_up - t0,
                                   "group_init": max(r.get("group_init", 0.0) for r in ranks),
                                   "weight_load": max(r.get("weight_load", 0.0) for r in ranks),
                                   "setup": time.perf_counter() - t_up})
        if gpu_ids:
            log.info("rank(s) %s replaced by spare processes", sorted(gpu_ids))
        if self.spares is not None and gpu_ids:   # replace the spares used, once the replay is under way
            self.spares.fill_later([i["node_id"] for i in infos])
        for info in infos:
            log.info("rank %d on node %s holds experts %s", info["rank"], info["node_id"], info["experts"])

    def recover(self, failure: Exception | None, timeout: float) -> list[int]:
        """Replaces the failed ranks and keeps the others (RankGroup.recover). The failed ranks
        are the one `failure` names and every rank that does not answer a probe at once; after
        a hang where all answer, those that owed the step and were not waiting in a collective
        (the rank the others waited for). Failed actors are killed, dead, raising, hung or
        stopped alike, so none can rejoin; survivors wait for the failed step to end (their
        all-to-all reports the peer gone), leave the old group and rejoin the new one with their
        weights and KV caches. A survivor that cannot leave within SURVIVOR_RELEASE_S is
        replaced too. When a recovery itself fails every actor is killed, so the next one
        replaces them all."""
        t0 = time.perf_counter()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        try:
            if not self.actors:  # a failed recovery killed them all
                self.start_seconds = {}
                self._launch(timeout, progress=False)
                return list(range(self.parallel.ep_size))
            failed = self._failed_ranks(failure)
            self._kill_actors(failed)
            survivors = [r for r in range(self.parallel.ep_size) if r not in failed]
            stuck = self._release(survivors)
            if stuck:
                self._kill_actors(stuck)
                failed = sorted(failed + stuck)
            self.start_seconds = {"release": time.perf_counter() - t0}
            self._launch(timeout, progress=False, replace=failed)
            return failed
        except BaseException:
            self._kill_actors()
            raise

    def _failed_ranks(self, failure: Exception | None) -> list[int]:
        import ray

        named = {failure.rank} if isinstance(failure, RankFailed) else set()
        refs = [a.probe.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        answers: dict[int, dict | None] = {}
        for r, ref in enumerate(refs):
            try:
                answers[r] = ray.get(ref, timeout=0) if ref in ready else None
            except Exception:  # the actor is dead
                answers[r] = None
        silent = {r for r, a in answers.items() if a is None}
        failed = named | silent
        if not failed and isinstance(failure, StepTimeout):
            waited_for = {r for r in failure.ranks if not answers[r]["in_collective"]}
            failed = waited_for or set(failure.ranks)
        elif not failed:  # a timeout that names no rank: none can be trusted
            failed = set(range(len(self.actors)))
        return sorted(failed)

    def _release(self, survivors: list[int]) -> list[int]:
        """Survivors leave the old group; returns those that could not (to be replaced too)."""
        import ray

        refs = {r: self.actors[r].leave_group.remote(SURVIVOR_RELEASE_S) for r in survivors}
        stuck = []
        for r, ref in refs.items():
            try:
                ray.get(ref, timeout=SURVIVOR_RELEASE_S + 5)
            except Exception as e:
                log.warning("rank %d could not leave the failed group (%s: %s); replacing it too",
                            r, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                stuck.append(r)
        return stuck

    def _kill_actors(self, ranks: list[int] | None = None) -> None:
        """Kills the actors of `ranks` (default: all, and forgets them)."""
        import ray

        for r in (range(len(self.actors)) if ranks is None else ranks):
            if self.actors[r] is None:
                continue
            try:
                ray.kill(self.actors[r])
            except Exception:  # already dead
                pass
            self.actors[r] = None
        if ranks is None:
            self.actors = []

    def step(self, plans: list[RankPlan], timeout: float) -> list[RankResult]:
        """One lockstep step over the ranks' step channels (engine/step_channel.py). A rank that
        raises or dies surfaces at once as RankFailed, even while its peers are still blocked in
        the collective it never joined; a hung rank as TimeoutError after `timeout` s."""
        try:
            return self._channel.exchange(plans, timeout)
        except RankFailed as e:
            if e.kind == "ConnectionError":
                raise RankFailed(e.rank, e.kind, f"{e.detail}; {self._death_cause(e.rank)}") from e
            raise

    def check_alive(self, timeout: float) -> None:
        """A rank process that died closes its step channel: found without asking Ray."""
        closed = self._channel.closed_ranks()
        if closed:
            rank = closed[0]
            raise RankFailed(rank, "ConnectionError", f"its process exited while idle; {self._death_cause(rank)}")

    def _death_cause(self, rank: int, wait: float = 5.0) -> str:
        """What Ray knows of why a rank's process went away (OOM kill, ray.kill, a node lost)."""
        import ray

        try:
            ray.get(self.actors[rank].__ray_ready__.remote(), timeout=wait)
        except ray.exceptions.RayActorError as e:
            # Ray's text: a headline, tab-indented actor fields, then "The actor is dead because ...".
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("\t")]
            why = [ln for ln in lines if ln.startswith("The actor is dead")] or lines
            return f"Ray: {why[0][:300]}" if why else "Ray reports the actor dead"
        except Exception as e:  # Ray itself unreachable or slow: say so rather than wait longer
            return f"Ray did not say why ({type(e).__name__})"
        return "Ray still reports the actor alive"

    def call(self, method: str, *args, timeout: float = CALL_TIMEOUT_S) -> list:
        import ray

        try:
            return ray.get([a.call.remote(method, *args) for a in self.actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"the ranks did not finish {method} within {timeout:.0f}s") from None

    def submit_host_work(self, fn, *args):
        """Host-side torch work (image preprocessing) on one helper thread of this process, off
        the caller's event loop; the ranks compute in their own processes."""
        if self._host is None:
            self._host = ComputeThread("maverick-host")
        return self._host.submit(fn, *args)

    def shutdown(self) -> None:
        import ray

        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._kill_actors()
        if self.spares is not None:
            self.spares.shutdown()
            self.spares = None
        if self._host is not None:
            self._host.shutdown()
            self._host = None
        if self.own_pg and self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
