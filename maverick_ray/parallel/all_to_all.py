"""Expert-parallel dispatch over DeepSpeed's all-to-all (deepspeed.comm.all_to_all_single).

Shape legend: R routed rows this rank sends, C hidden, W ranks, Rl rows this rank receives,
B bytes of one packed row (C * itemsize + 8), K rows per destination in a padded exchange,
E logical experts, S physical slots over all ranks (parallel/placement.py), M most replicas
of any expert.
Replicas: each row goes to one slot of its expert. The k-th row this rank routes to expert e
in a layer of its n-th step goes to replica (k + rank + n) % replicas(e) of e: a hot expert's
rows are spread evenly over its copies, single rows from different ranks go to different
copies, and a lone decoding sequence alternates copies from step to step. The choice is the
sender's, deterministic, and travels with the row as its slot's global id, so the receiver
needs nothing beyond the placement itself.
Dropless: no capacity factor, no row is ever dropped. Two ways to dispatch, chosen per step
and the same on every rank:
- padded (small steps, e.g. decode): every rank knows the most rows any rank routes this step
  (the engine sends it with each plan), so each rank sends K = that many row slots to every
  peer in ONE all-to-all; unused slots carry expert id -1 and are dropped on arrival.
- counted (large steps, e.g. long prefills): per-destination counts are exchanged first, then
  exactly the rows (two all-to-alls), so no padding crosses the wire.
Either way the results come back in one all-to-all with exact split sizes.
"""

from __future__ import annotations

import time

import torch

from ..model.moe import DispatchStats
from .placement import ExpertPlacement


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
    """The `Dispatcher` (model/moe.py) of an expert-parallel rank."""

    def __init__(self, placement: ExpertPlacement, rank: int, group=None, padded_max_rows: int = 512):
        """padded_max_rows: the padded exchange is used while W * K stays at or below this many
        row slots per rank (one collective instead of two, at the cost of sending padding)."""
        import deepspeed.comm as dist  # deferred: importing deepspeed is slow and logs

        self.dist, self.group, self.rank = dist, group, rank
        self.world = placement.world_size
        self.set_placement(placement)
        self.stats = DispatchStats()
        self.padded_max_rows = padded_max_rows
        self.slots_per_peer: int | None = None  # K of this step's padded exchange; None: counted
        self.in_collective = False  # inside an all-to-all now: read by another thread when a step hangs
        self.steps = 0  # begin_step calls so far: rotates which replica takes a row (module docstring)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Routes by `placement` from the next dispatch on (every rank must switch at the same step)."""
        if placement.world_size != self.world:
            raise ValueError(f"a placement over {placement.world_size} ranks for a group of {self.world}")
        self.placement = placement
        replicas = placement.replica_slots()
        self._replicas = replicas                                        # host copies for the padded path
        self._slot_rank, self._slot_local = placement.slot_ranks(), placement.slot_locals()
        self.redundant = any(len(r) > 1 for r in replicas)
        width = max(len(r) for r in replicas)
        self.replica_table = torch.tensor([r + [r[0]] * (width - len(r)) for r in replicas], dtype=torch.long)  # (E, M)
        self.replica_count = torch.tensor([len(r) for r in replicas], dtype=torch.long)                        # (E,)
        self.slot_rank = torch.tensor(self._slot_rank, dtype=torch.long)                                      # (S,)
        self.slot_local = torch.tensor(self._slot_local, dtype=torch.long)                                    # (S,)

    def choose_slots(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """(R,) global expert ids -> (R,) global slot ids: the k-th row for expert e goes to
        replica (k + rank + steps) % replicas(e) of e (module docstring)."""
        table = self.replica_table.to(expert_ids.device)
        if not self.redundant or expert_ids.numel() == 0:
            return table[expert_ids, 0]
        R = expert_ids.shape[0]
        by_expert = torch.argsort(expert_ids, stable=True)                               # (R,)
        counts = torch.bincount(expert_ids, minlength=table.shape[0])                    # (E,)
        first = torch.cumsum(counts, 0) - counts                                         # (E,) first row of each run
        sorted_ids = expert_ids[by_expert]
        occurrence = torch.empty_like(expert_ids)
        occurrence[by_expert] = torch.arange(R, device=expert_ids.device) - first[sorted_ids]   # (R,) k of each row
        choice = (occurrence + self.rank + self.steps) % self.replica_count.to(expert_ids.device)[expert_ids]
        return table[expert_ids, choice]

    def begin_step(self, max_rows_any_rank: int | None) -> None:
        """Starts a step: resets the step's stats and sets its exchange from the most routed rows
        any rank sends in one MoE layer (the same number on every rank; None when unknown).
        Every rank must call it alike."""
        self.stats.reset()
        self.steps += 1
        k = max_rows_any_rank
        self.slots_per_peer = k if k and k * self.world <= self.padded_max_rows else None

    def _a2a(self, out, inp, out_splits=None, in_splits=None):
        t0 = time.perf_counter()
        self.in_collective = True
        try:
            self.dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                        group=self.group)
        finally:
            self.in_collective = False
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes_sent += inp.numel() * inp.element_size()

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, layer: int):
        """x (R, C), global expert_ids (R,) -> (received rows (Rl, C), local slot ids (Rl,), handle)."""
        if self.slots_per_peer is not None:
            return self._dispatch_padded(x, expert_ids, layer)
        slots = self.choose_slots(expert_ids)                             # (R,) global slot ids
        dest = self.slot_rank.to(slots.device)[slots]                     # (R,)
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world)          # (W,)
        # Rows and their slot ids travel in one message: each row's bytes followed by its id's.
        packed = _pack(x[order], slots[order])                            # (R, B) uint8
        recv_counts = torch.empty_like(send_counts)
        self._a2a(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        got = torch.empty(sum(recv), packed.shape[1], dtype=torch.uint8, device=packed.device)
        self._a2a(got, packed, recv, send)
        rows, ids = _unpack(got, x.dtype, x.shape[1])
        self.stats.received_per_layer[layer] = sum(recv)
        return rows, self.slot_local.to(ids.device)[ids], (order, send, recv)

    def _dispatch_padded(self, x: torch.Tensor, expert_ids: torch.Tensor, layer: int):
        """The one-collective exchange of K row slots per peer (slot w*K + j: the j-th row this
        rank sends to rank w). Its few dozen rows are planned on the host from the ids as a list:
        at decode sizes that is cheaper than the dozen small tensor ops of the counted path.
        Rows travel packed as in the counted path (_pack: row bytes, then the id's 8 bytes)."""
        K, W, dev = self.slots_per_peer, self.world, x.device
        ids = expert_ids.tolist()
        R, nbytes = len(ids), x.shape[1] * x.element_size()
        if R > K:
            raise RuntimeError(f"rank {self.rank} routes {R} rows, more than the step's {K} slots per peer")
        send, slot, phys, seen = [0] * W, [], [], {}
        for e in ids:
            copies = self._replicas[e]
            k = seen.get(e, 0)
            seen[e] = k + 1
            g = copies[(k + self.rank + self.steps) % len(copies)]   # choose_slots' rule, on the host
            d = self._slot_rank[g]
            phys.append(g)
            slot.append(d * K + send[d])
            send[d] += 1
        buf = torch.full((W * K, nbytes + 8), 255, dtype=torch.uint8, device=dev)  # padding's id reads as -1
        if R:
            buf.index_copy_(0, torch.tensor(slot, dtype=torch.long, device=dev),
                            _pack(x, torch.tensor(phys, dtype=torch.long, device=dev)))
        got = torch.empty_like(buf)
        self._a2a(got, buf)
        got_ids = got[:, nbytes:].contiguous().view(torch.int64).view(-1).tolist()    # (W * K,)
        keep = [i for i, e in enumerate(got_ids) if e >= 0]                          # source-rank order
        recv = [0] * W
        for i in keep:
            recv[i // K] += 1
        rows = got[:, :nbytes].index_select(0, torch.tensor(keep, dtype=torch.long, device=dev))
        local = torch.tensor([self._slot_local[got_ids[i]] for i in keep], dtype=torch.long, device=dev)
        self.stats.received_per_layer[layer] = len(keep)
        # Results come back grouped by destination, each group in row order: `order` maps them home.
        order = torch.tensor(sorted(range(R), key=slot.__getitem__), dtype=torch.long, device=dev)
        return rows.view(x.dtype).view(len(keep), x.shape[1]), local, (order, send, recv)

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """y (Rl, C) in received order -> (R, C) in this rank's original row order."""
        order, send, recv = handle
        back = torch.empty(sum(send), y.shape[1], dtype=y.dtype, device=y.device)
        self._a2a(back, y.contiguous(), send, recv)
        out = torch.empty_like(back)
        out[order] = back
        return out
