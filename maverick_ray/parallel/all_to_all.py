"""Expert-parallel dispatch over DeepSpeed's all-to-all (deepspeed.comm.all_to_all_single).

Shape legend: R routed rows this rank sends, C hidden, W ranks, Rl rows this rank receives.
Dropless: no capacity factor; per-destination counts are exchanged first so every rank
knows how many rows it will receive from each peer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .placement import ExpertPlacement


@dataclass
class DispatchStats:
    """Accumulated over one engine step; reset by the worker each step."""

    seconds: float = 0.0
    bytes_sent: int = 0
    received_per_layer: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.seconds, self.bytes_sent = 0.0, 0
        self.received_per_layer = {}


def _pack(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (R, C) any dtype, ids (R,) int64 -> (R, C * itemsize + 8) uint8, row r = x[r] bytes + ids[r] bytes."""
    xb = x.contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1] * x.element_size())
    ib = ids.to(torch.int64).contiguous().view(torch.uint8).reshape(ids.shape[0], 8)
    return torch.cat([xb, ib], dim=1)


def _unpack(packed: torch.Tensor, dtype: torch.dtype, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _pack: (R, C * itemsize + 8) uint8 -> x (R, C) of dtype, ids (R,) int64."""
    nbytes = packed.shape[1] - 8
    x = packed[:, :nbytes].contiguous().view(dtype).reshape(packed.shape[0], width)
    ids = packed[:, nbytes:].clone(memory_format=torch.contiguous_format).view(torch.int64).reshape(-1)  # own storage
    return x, ids


class AllToAllDispatcher:
    def __init__(self, placement: ExpertPlacement, rank: int, group=None):
        import deepspeed.comm as dist  # deferred: importing deepspeed is slow and logs

        self.dist, self.group, self.rank = dist, group, rank
        self.world = placement.world_size
        self.owner = placement.owner_tensor()
        self.local_index = placement.local_index_tensor()
        self.stats = DispatchStats()

    def _a2a(self, out, inp, out_splits=None, in_splits=None):
        t0 = time.perf_counter()
        self.dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                    group=self.group)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes_sent += inp.numel() * inp.element_size()

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, layer: int):
        """x (R, C), global expert_ids (R,) -> (received rows (Rl, C), local expert ids (Rl,), handle)."""
        dest = self.owner.to(expert_ids.device)[expert_ids]                # (R,)
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world)          # (W,)
        recv_counts = torch.empty_like(send_counts)
        self._a2a(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # Rows and their expert ids travel in one collective: each row's bytes followed by its id's.
        packed = _pack(x[order], expert_ids[order])                       # (R, C*bytes + 8) uint8
        got = torch.empty(sum(recv), packed.shape[1], dtype=torch.uint8, device=x.device)
        self._a2a(got, packed, recv, send)
        rows, ids = _unpack(got, x.dtype, x.shape[1])
        self.stats.received_per_layer[layer] = sum(recv)
        return rows, self.local_index.to(ids.device)[ids], (order, send, recv)

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """y (Rl, C) in received order -> (R, C) in this rank's original row order."""
        order, send, recv = handle
        back = torch.empty(sum(send), y.shape[1], dtype=y.dtype, device=y.device)
        self._a2a(back, y.contiguous(), send, recv)
        out = torch.empty_like(back)
        out[order] = back
        return out
