"""A live rebalance on one rank: the new placement's slot weights staged while the rank serves,
then swapped in between two steps (engine/live_eplb.py drives it over all ranks).

Where new slots get their weights: from the checkpoint, each rank reading only the experts it
does not hold yet (checkpoint.loader with only_routed_experts); slots whose expert the rank
already holds are copied from its own weights. Not from a peer over the collective group: the
group is busy with every step's all-to-all, and a transfer there would have to be interleaved
with the lockstep steps by every rank at once; a read of a few experts' byte ranges needs no
peer and runs on a thread of its own beside the steps (on a multi-node cluster the checkpoint
is on every node already, since ranks load from it).

Peak extra memory: the staged tensors, one full copy of the rank's routed-expert weights in the
new slot order, held until the swap frees the old ones (`Staged.nbytes`, reported).

Shape legend: S slots of this rank, then the experts' own dims (`Experts`: gate_up_proj (S, C, 2I),
down_proj (S, I, C); `Fp8Experts`: gate_up_proj (S, 2I, C) FP8 with gate_up_proj_scale (S, 2I), ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..parallel.placement import ExpertPlacement


@dataclass
class Staged:
    placement: ExpertPlacement
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {name: (S, ...)}
    nbytes: int = 0
    moved_bytes: int = 0   # of the slots filled from the checkpoint (experts this rank did not hold)
    loaded_experts: list[int] = field(default_factory=list)   # read from the checkpoint
    seconds: float = 0.0


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The routed-experts modules of a model by qualified name (bf16/fp32 `Experts` or `Fp8Experts`)."""
    from ..model.fp8_experts import Fp8Experts
    from ..model.moe import Experts

    return {name: m for name, m in model.named_modules() if isinstance(m, (Experts, Fp8Experts))}


def _slot_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A routed-experts module's per-slot tensors: its parameters and buffers (FP8 weights, scales)."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def stage(model: nn.Module, checkpoint: Path, config, rank: int, current: ExpertPlacement,
          new: ExpertPlacement, dtype: torch.dtype, keep_fp8: bool) -> Staged:
    """The weights of `rank`'s slots under `new`, built beside the live ones (which it only reads)."""
    from ..checkpoint.loader import load_state_dict
    from ..model.fused import output_major

    t0 = time.perf_counter()
    old_slots, new_slots = current.experts_of(rank), new.experts_of(rank)
    held = {}
    for j, e in enumerate(old_slots):
        held.setdefault(e, j)
    need = sorted(set(new_slots) - set(held))
    loaded = (load_state_dict(checkpoint, config, expert_ids=need, dtype=dtype, include_vision=False,
                              progress=False, keep_fp8_experts=keep_fp8, only_routed_experts=True) if need else {})
    row_of = {e: i for i, e in enumerate(need)}
    staged = Staged(new, loaded_experts=need)
    for name, module in experts_modules(model).items():
        out_module = staged.tensors[name] = {}
        for tname, cur in _slot_tensors(module).items():
            out = torch.empty((len(new_slots),) + tuple(cur.shape[1:]), dtype=cur.dtype, device=cur.device)
            for j, e in enumerate(new_slots):
                if e in held:
                    out[j] = cur[held[e]]
                else:
                    out[j] = loaded[f"{name}.{tname}"][row_of[e]].to(cur.device, cur.dtype)
                    staged.moved_bytes += out[j].numel() * out.element_size()
            if cur.dim() == 3 and not cur.is_contiguous():   # the fused (output-major) CPU layout
                out = output_major(out)
            out_module[tname] = out
            staged.nbytes += out.numel() * out.element_size()
    staged.seconds = time.perf_counter() - t0
    return staged


def apply(model: nn.Module, staged: Staged, rank: int) -> None:
    """Swaps the staged tensors of `rank` in (the old ones are freed once nothing else holds them)."""
    for name, module in experts_modules(model).items():
        for tname, t in staged.tensors[name].items():
            if tname in module._parameters:
                module._parameters[tname] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[tname] = t
        if getattr(module, "kernel", None) is not None:   # the native CPU kernel checks the new layout
            module.use_kernel(module.kernel)
    model.expert_ids = list(staged.placement.experts_of(rank))
