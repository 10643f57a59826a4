"""Loads HF Llama 4 safetensors (one file or sharded) into internal names, reading only the
routed experts a rank owns (safetensors slicing), so 1/4 of the experts costs ~1/4 of the bytes.
Which tensors, rows and byte ranges a rank reads is decided first, from the headers alone
(read_plan.py: plan_reads); this module then reads exactly those.

Experts come back fused whatever the on-disk layout: gate_up_proj (n_sel, C, 2I) and
down_proj (n_sel, I, C), ordered by sorted(expert_ids).

FP8 checkpoints (compressed-tensors, fp8.py): every FP8 weight is read with its weight_scale and
dequantized in fp32 (W = weight * scale), then cast to `dtype`. With keep_fp8_experts the routed
experts stay FP8 instead, for FP8 matmuls (model/fp8_experts.py); see load_state_dict.
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
from .fp8 import channel_scales, dequantize
from .names import TEXT_PREFIX, is_routed_expert
from .read_plan import TensorRead, plan_reads

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
                    progress: bool = True, include_text: bool = True,
                    keep_fp8_experts: bool = False, only_routed_experts: bool = False) -> dict[str, torch.Tensor]:
    """Reads a checkpoint directory into {internal name: tensor} (see names.py): the reads that
    read_plan.plan_reads lists for these experts, and nothing else. FP8 weights (a compressed-tensors
    checkpoint) come back dequantized to `dtype`.

    keep_fp8_experts: FP8 routed experts are not dequantized. Each expert target then holds the
    FP8 weights output-major, gate_up_proj (n_sel, 2I, C) and down_proj (n_sel, C, I) (the
    transpose of the dequantized form), and `<target>_scale` fp32 (n_sel, 2I) / (n_sel, C), one
    scale per output row; model/fp8_experts.py runs them. Ignored unless the experts are FP8.
    only_routed_experts: read the routed experts' tensors and nothing else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = cfg or ModelConfig.from_pretrained(path)
    wm = weight_map(path)
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in wm) else ""
    plan = plan_reads(path, cfg, wm, expert_ids, include_vision=include_vision, include_text=include_text,
                      only_routed_experts=only_routed_experts)
    targets = plan.by_target()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), desc=f"loading {path.name}", unit="tensor", leave=False)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        reader = _Reader(path, wm, stack)
        for name, reads in targets.items():
            if keep_fp8_experts and reads and reads[0].expert is not None and _all_fp8(reads):
                out[name], out[name + "_scale"] = _assemble_fp8_experts(reader, reads)
            else:
                t = _assemble(reader, reads, plan.shapes[name])
                if tuple(t.shape) != plan.shapes[name]:
                    raise CheckpointError(f"{reads[0].disk}: shape {tuple(t.shape)} in {reads[0].file} does not "
                                          f"match the config's {plan.shapes[name]}")
                out[name] = t.to(dtype)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not only_routed_experts:
        _warn_unexpected(wm, plan.disk_names, prefix, include_vision)
    return out


def _all_fp8(reads: list[TensorRead]) -> bool:
    """Whether every weight among these reads is FP8 (has its scale read)."""
    return sum(r.kind == "scale" for r in reads) * 2 == len(reads)


def _read_weights(reader: "_Reader", reads: list[TensorRead]) -> dict[tuple[int | None, str | None], torch.Tensor]:
    """(expert, part) -> the on-disk weight, FP8 ones dequantized with the scale read after them."""
    out: dict[tuple[int | None, str | None], torch.Tensor] = {}
    for r in reads:
        key = (r.expert, r.part)
        if r.kind == "scale":
            out[key] = dequantize(out[key], reader.read(r.disk))
        else:
            out[key] = reader.read(r.disk, list(r.rows) if r.rows is not None else None)
    return out


def _assemble(reader: "_Reader", reads: list[TensorRead], shape: tuple[int, ...]) -> torch.Tensor:
    """One internal tensor from its planned reads: a whole tensor, the owned rows of fused experts,
    or split per-expert tensors fused into (n, C, 2I) / (n, I, C); FP8 weights dequantized."""
    if not reads:   # no experts on this rank
        return torch.empty(*shape)
    weights = _read_weights(reader, reads)
    if reads[0].expert is None:
        return weights[(None, None)]
    parts = []
    for e in sorted({r.expert for r in reads}):
        if (e, "down_proj") in weights:
            parts.append(weights[(e, "down_proj")].T)                                        # (I, C)
        else:
            parts.append(torch.cat([weights[(e, "gate_proj")].T, weights[(e, "up_proj")].T], dim=-1))  # (C, 2I)
    return torch.stack(parts)


def _assemble_fp8_experts(reader: "_Reader", reads: list[TensorRead]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split FP8 experts kept FP8: (n, 2I, C) or (n, C, I) weights, output-major, and (n, rows) fp32 scales."""
    raw = {(r.expert, r.part, r.kind): reader.read(r.disk) for r in reads}
    experts = sorted({r.expert for r in reads})
    parts = ("down_proj",) if (experts[0], "down_proj", "weight") in raw else ("gate_proj", "up_proj")
    weights, scales = [], []
    for e in experts:
        ws = [raw[(e, p, "weight")] for p in parts]
        weights.append(torch.cat(ws, dim=0))
        scales.append(torch.cat([channel_scales(raw[(e, p, "scale")], w.shape[0]) for p, w in zip(parts, ws)]))
    return torch.stack(weights), torch.stack(scales)


def _warn_unexpected(wm, used, prefix, include_vision):
    skip = ("vision_model.", "multi_modal_projector.")
    extra = [k for k in wm if k not in used and not is_routed_expert(k) and ".experts." not in k
             and (include_vision or not k.startswith(skip))]
    if extra:
        log.warning("checkpoint has %d tensors the model does not use, e.g. %s", len(extra), extra[:3])


def routed_expert_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes held by routed-expert tensors of a state dict."""
    return sum(t.numel() * t.element_size() for k, t in state.items() if is_routed_expert(k))
