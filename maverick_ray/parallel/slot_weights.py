"""A rank's routed-expert weights in slot order (parallel/placement.py).

The loader (checkpoint/loader.py) reads each distinct expert once, in expert-id order; a rank's
slots may hold its experts in any order and may hold an expert twice (a replica). `to_slot_order`
turns the first into the second.

Shape legend: Ed distinct experts read, S slots of this rank, then the expert's own dims
(gate_up_proj: C, 2I; down_proj: I, C; the `<name>_scale` of FP8 experts kept FP8: rows).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..checkpoint.names import is_routed_expert


def to_slot_order(state: dict[str, torch.Tensor], slots: Sequence[int]) -> dict[str, torch.Tensor]:
    """state's routed-expert tensors (Ed, ...) in sorted(set(slots)) order -> (S, ...), row j =
    expert slots[j]. Other tensors pass through; with each expert once and in id order nothing
    is copied."""
    distinct = sorted(set(slots))
    if list(slots) == distinct:
        return state
    pos = {e: i for i, e in enumerate(distinct)}
    index = torch.tensor([pos[e] for e in slots], dtype=torch.long)   # (S,) row of each slot's expert
    out = {}
    for name, t in state.items():
        if is_routed_expert(name.removesuffix("_scale")):   # FP8 experts' per-expert scales too
            if t.shape[0] != len(distinct):
                raise ValueError(f"{name}: {t.shape[0]} experts loaded, expected {len(distinct)} (one per distinct "
                                 "expert of this rank's slots)")
            t = t.index_select(0, index)
        out[name] = t
    return out
