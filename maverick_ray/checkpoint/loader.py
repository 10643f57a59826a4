"""Loads HF Llama 4 safetensors (one file or sharded) into internal names, reading only the
routed experts a rank owns (safetensors slicing), so 1/4 of the experts costs ~1/4 of the bytes.

Experts come back fused whatever the on-disk layout: gate_up_proj (n_sel, C, 2I) and
down_proj (n_sel, I, C), ordered by sorted(expert_ids).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch

from ..config import ModelConfig
from .errors import CheckpointError
from .names import (TEXT_PREFIX, expected_text_tensors, expected_vision_tensors, is_routed_expert,
                    split_expert_names)

log = logging.getLogger(__name__)


def weight_map(path: Path) -> dict[str, str]:
    """On-disk tensor name -> safetensors file name, from the index or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index.name}: not valid JSON ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index.name}: has no 'weight_map' object")
        for fname in sorted(set(wm.values())):
            if not (path / fname).exists():
                tensor = next(k for k, v in wm.items() if v == fname)
                raise CheckpointError(f"{fname}: shard listed in {index.name} (for tensor {tensor}) "
                                      f"is missing from {path}")
        return wm
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights in {path}: expected model.safetensors or "
                              "model.safetensors.index.json with its shards")
    from safetensors import safe_open

    wm = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                wm.update({k: f.name for k in h.keys()})
        except Exception as e:
            raise CheckpointError(f"{f.name}: not a readable safetensors file ({e})") from None
    return wm


def _expert_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class _Reader:
    def __init__(self, path: Path, wm: dict[str, str], stack: ExitStack):
        self.path, self.wm, self.stack, self.handles = path, wm, stack, {}

    def _handle(self, fname: str):
        if fname not in self.handles:
            from safetensors import safe_open

            try:
                self.handles[fname] = self.stack.enter_context(safe_open(str(self.path / fname), framework="pt"))
            except Exception as e:
                raise CheckpointError(f"{fname}: cannot be opened as safetensors ({e})") from None
        return self.handles[fname]

    def has(self, name: str) -> bool:
        return name in self.wm

    def file_of(self, name: str) -> str:
        return self.wm.get(name, "?")

    def read(self, name: str, rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        if name not in self.wm:
            raise CheckpointError(f"{name}: missing tensor (looked in {sorted(set(self.wm.values()))})")
        fname = self.wm[name]
        h = self._handle(fname)
        try:
            if rows is None:
                return h.get_tensor(name)
            sl = h.get_slice(name)
            return torch.cat([sl[a:b] for a, b in rows], 0)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read from {fname} ({e})") from None


def load_state_dict(path: str | Path, cfg: ModelConfig | None = None, expert_ids: Iterable[int] | None = None,
                    dtype: torch.dtype = torch.float32, include_vision: bool = True,
                    progress: bool = True, include_text: bool = True) -> dict[str, torch.Tensor]:
    """Reads a checkpoint directory into {internal name: tensor} (see names.py)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = cfg or ModelConfig.from_pretrained(path)
    wm = weight_map(path)
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in wm) else ""
    E = cfg.text.num_local_experts
    experts = sorted(set(range(E) if expert_ids is None else expert_ids))
    if any(not 0 <= e < E for e in experts):
        raise CheckpointError(f"expert ids {experts} out of range for {E} experts")
    runs = _expert_runs(experts)
    expected = dict(expected_text_tensors(cfg.text)) if include_text else {}
    if include_vision:
        expected.update({("\0" + k): v for k, v in expected_vision_tensors(cfg).items()})  # \0: no prefix
    items = list(expected.items())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"loading {path.name}", unit="tensor", leave=False)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    with ExitStack() as stack:
        reader = _Reader(path, wm, stack)
        for key, shape in items:
            name = key[1:] if key.startswith("\0") else key
            disk = name if key.startswith("\0") else prefix + name
            if is_routed_expert(name):
                t, names = _read_experts(reader, disk, experts, runs, shape)
                shape = (len(experts),) + tuple(shape[1:])
                used.update(names)
            else:
                t = reader.read(disk)
                used.add(disk)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{disk}: shape {tuple(t.shape)} in {reader.file_of(disk)} does not match "
                                      f"the config's {tuple(shape)}")
            out[name] = t.to(dtype)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    _warn_unexpected(wm, used, prefix, include_vision)
    return out


def _read_experts(reader: _Reader, disk: str, experts: list[int], runs, shape):
    """Fused expert tensor for the selected experts, from the fused or the split layout."""
    if reader.has(disk):
        t = reader.read(disk, runs)
        if t.dim() != 3 or tuple(t.shape[1:]) != tuple(shape[1:]):
            raise CheckpointError(f"{disk}: shape {tuple(t.shape)} in {reader.file_of(disk)} does not match "
                                  f"the config's {tuple(shape)}")
        return t, [disk]
    first = split_expert_names(disk, experts[0] if experts else 0)
    if not any(reader.has(n) for n in first.values()):
        raise CheckpointError(f"{disk}: missing tensor (neither fused nor split experts such as "
                              f"{first['gate_proj']} are in the checkpoint)")
    parts, names = [], []
    for e in experts:
        n = split_expert_names(disk, e)
        if disk.endswith("gate_up_proj"):
            gate, up = reader.read(n["gate_proj"]), reader.read(n["up_proj"])  # (I, C) each
            parts.append(torch.cat([gate.T, up.T], dim=-1))                      # (C, 2I)
            names += [n["gate_proj"], n["up_proj"]]
        else:
            parts.append(reader.read(n["down_proj"]).T)                          # (I, C)
            names.append(n["down_proj"])
    for p, name in zip(parts, names[::2] if disk.endswith("gate_up_proj") else names):
        if tuple(p.shape) != tuple(shape[1:]):
            raise CheckpointError(f"{name}: shape {tuple(p.T.shape)} in {reader.file_of(name)} does not match "
                                  f"the config's expert shape")
    return torch.stack(parts) if parts else torch.empty(0, *shape[1:]), names


def _warn_unexpected(wm, used, prefix, include_vision):
    skip = ("vision_model.", "multi_modal_projector.")
    extra = [k for k in wm if k not in used and not is_routed_expert(k) and ".experts." not in k
             and (include_vision or not k.startswith(skip))]
    if extra:
        log.warning("checkpoint has %d tensors the model does not use, e.g. %s", len(extra), extra[:3])


def routed_expert_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes held by routed-expert tensors of a state dict."""
    return sum(t.numel() * t.element_size() for k, t in state.items() if is_routed_expert(k))
