"""A torch.distributed backend for CPU ranks: all-to-all over shared memory when every rank of
the group is on one host, gloo for everything else.

gloo moves even a 64 KiB all-to-all over loopback TCP through its own I/O threads (~0.22 ms
between two idle processes here); an expert-parallel decode step runs two per MoE layer. When
all ranks can map one segment (native/shm_exchange.c), `all_to_all_single` copies through it
instead (microseconds). Whether they can is found out, not assumed: rank 0 creates a segment
under /dev/shm and announces its name in the group's store, every rank tries to map it and
reports back, and only if all succeed does the group use it; otherwise (ranks on several hosts,
containers without a shared /dev/shm, no C compiler) every rank uses gloo. DeepSpeed's
communication layer sits on top unchanged: `deepspeed.init_distributed(dist_backend=BACKEND)`.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta

import torch
import torch.distributed as dist

from ..native.shm_exchange import SharedMemoryExchange

log = logging.getLogger(__name__)

BACKEND = "maverick_host"   # the name to pass as dist_backend
SHM_DIR = "/dev/shm"


class _Done(dist._Work):
    """The Work of a collective that finished before its call returned."""

    def __init__(self, result=None):
        super().__init__()
        self._future = torch.futures.Future()
        self._future.set_result(result)

    def wait(self, timeout=None) -> bool:
        return True

    def get_future(self):
        return self._future


def _connect(store: dist.Store, rank: int, world: int, timeout: timedelta) -> tuple[SharedMemoryExchange | None, str]:
    """Every rank calls this alike. Returns (the exchange, why) with the exchange None on every
    rank unless every rank mapped the segment."""
    path, exchange, why = None, None, "ok"
    try:
        if rank == 0:
            token = secrets.randbits(63)
            path = os.path.join(SHM_DIR, f"maverick-ray-a2a-{os.getpid()}-{secrets.token_hex(6)}")
            try:
                SharedMemoryExchange.create(path, world, token)
                store.set("segment", f"{path}|{token}")
            except OSError as exc:
                store.set("segment", f"|0|{exc}")
        announced = store.get("segment").decode()
        seg_path, token_s = announced.split("|", 2)[:2]
        if not seg_path:
            why = f"rank 0 could not create a segment: {announced.split('|', 2)[2]}"
        else:
            try:
                exchange = SharedMemoryExchange.attach(seg_path, world, rank, int(token_s), timeout.total_seconds())
            except OSError as exc:
                why = f"rank {rank} could not map {seg_path}: {exc}"
        store.set(f"mapped/{rank}", "1" if exchange else why)
        for r in range(world):
            answer = store.get(f"mapped/{r}").decode()
            if answer != "1" and why == "ok":
                why = answer
    finally:
        if path is not None and rank == 0:
            try:
                os.unlink(path)   # every rank has reported: mapped segments outlive the name
            except OSError:
                pass
    if why != "ok" and exchange is not None:
        exchange.close()
        exchange = None
    return exchange, why


class HostProcessGroup(dist.ProcessGroup):
    """all_to_all_single over shared memory when the group shares a host (`shared_memory`
    says whether it does); every other collective, and non-CPU tensors, through gloo."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: timedelta):
        super().__init__(rank, world)
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world, timeout)
        self._exchange, why = _connect(dist.PrefixStore("shm", store), rank, world, timeout)
        if self._exchange is None:
            log.warning("expert-parallel all-to-all falls back to gloo: %s", why)
        self.fallback_reason = None if self._exchange else why

    @property
    def shared_memory(self) -> bool:
        return self._exchange is not None

    def getBackendName(self) -> str:
        return BACKEND

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        if self._exchange is None or output.device.type != "cpu":
            return self._gloo.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)
        into = output if output.is_contiguous() else torch.empty_like(output, memory_format=torch.contiguous_format)
        self._exchange.all_to_all(into, input.contiguous(), output_split_sizes, input_split_sizes)
        if into is not output:
            output.copy_(into)
        return _Done(output)


def _gloo_does(name: str):
    def call(self, *args, **kwargs):
        return getattr(self._gloo, name)(*args, **kwargs)
    call.__name__ = name
    return call


# Every other collective is gloo's.
for _name in ("allreduce", "allgather", "broadcast", "barrier", "alltoall", "reduce_scatter", "send", "recv"):
    setattr(HostProcessGroup, _name, _gloo_does(_name))


def register() -> str:
    """Makes BACKEND known to torch.distributed (idempotent) and returns its name."""
    if not hasattr(dist.Backend, BACKEND.upper()):   # register_backend sets Backend.<NAME>
        # The creator is called as (store, rank, world size, timeout): the group's constructor.
        dist.Backend.register_backend(BACKEND, HostProcessGroup, devices=["cpu"])
    return BACKEND
