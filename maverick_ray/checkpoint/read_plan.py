"""Which bytes of a safetensors checkpoint one rank reads, decided from the file headers alone.

`plan_reads` lists, for every tensor the model needs (names.py), the file, the on-disk tensor,
the rows of the routed experts the rank owns and the absolute byte ranges those rows occupy,
without reading any tensor data. The loader (loader.py) then reads exactly these rows; tests
run the planning against real-size synthetic headers (tests/test_real_size_dry_run.py).

safetensors layout: an 8-byte little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}} with offsets relative to byte 8 + n, then
the data, each tensor row-major and contiguous, so rows [a, b) of a (E, ...) tensor are the
bytes begin + a * row_bytes .. begin + b * row_bytes.

Experts on disk come fused (`experts.gate_up_proj` (E, C, 2I), `experts.down_proj` (E, I, C)) or
split (`experts.{e}.{gate,up,down}_proj.weight`, (I, C) / (I, C) / (C, I)).

FP8 checkpoints (compressed-tensors, fp8.py): every weight that config.json's quantization_config
quantizes must be stored as F8_E4M3 beside its `weight_scale`; the plan reads the scale too (a
read of kind "scale" right after its weight), so a rank still reads only its own experts' bytes,
scales included. FP8 experts come split only (that is the format's layout).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import ModelConfig
from .errors import CheckpointError
from .fp8 import FP8_DTYPE, SCALE_SUFFIX, Fp8Config, check_scale_shape, module_classes, read_quant_config
from .names import TEXT_PREFIX, expected_text_tensors, expected_vision_tensors, is_routed_expert, split_expert_names

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, with absolute byte offsets in its file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def row_range(self, a: int, b: int) -> tuple[int, int]:
        """Absolute byte range of rows [a, b) of the first dimension."""
        row = (self.end - self.start) // self.shape[0] if self.shape and self.shape[0] else 0
        return self.start + a * row, self.start + b * row


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry of one safetensors file; reads only the header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            out[name] = TensorEntry(info["dtype"], tuple(info["shape"]), base + begin, base + end)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None


@dataclass(frozen=True)
class TensorRead:
    """Bytes of one on-disk tensor that go into internal tensor `target`."""

    target: str                                 # internal name (names.py)
    disk: str                                   # name in the file
    file: str                                   # file name inside the checkpoint directory
    rows: tuple[tuple[int, int], ...] | None    # [start, stop) runs of the first dim; None = whole tensor
    byte_ranges: tuple[tuple[int, int], ...]    # absolute [start, stop) offsets in `file`
    expert: int | None = None                   # split layout: the expert this tensor holds
    part: str | None = None                     # split layout: gate_proj | up_proj | down_proj
    kind: str = "weight"                        # "weight", or "scale": the FP8 weight_scale of the read before

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.byte_ranges)


@dataclass
class ReadPlan:
    """Every read of one rank, in target order; `shapes` holds each target's expected shape."""

    reads: list[TensorRead] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.reads)

    def by_target(self) -> dict[str, list[TensorRead]]:
        out: dict[str, list[TensorRead]] = {t: [] for t in self.shapes}
        for r in self.reads:
            out[r.target].append(r)
        return out

    def bytes_per_file(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reads:
            out[r.file] = out.get(r.file, 0) + r.nbytes
        return out

    @property
    def disk_names(self) -> set[str]:
        return {r.disk for r in self.reads}


def expert_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class _Headers:
    def __init__(self, path: Path, wm: dict[str, str]):
        self.path, self.wm, self.cache = path, wm, {}

    def entry(self, name: str) -> tuple[str, TensorEntry] | None:
        fname = self.wm.get(name)
        if fname is None:
            return None
        if fname not in self.cache:
            self.cache[fname] = read_header(self.path / fname)
        entry = self.cache[fname].get(name)
        if entry is None:
            raise CheckpointError(f"{name}: listed for {fname} but not in that file's header")
        return fname, entry


def _shape_error(disk: str, got, fname: str, want) -> CheckpointError:
    return CheckpointError(f"{disk}: shape {tuple(got)} in {fname} does not match the config's {tuple(want)}")


def plan_reads(path: str | Path, cfg: ModelConfig, wm: dict[str, str], expert_ids: Iterable[int] | None = None,
               include_vision: bool = True, include_text: bool = True, quant: Fp8Config | None = None,
               only_routed_experts: bool = False) -> ReadPlan:
    """The reads that load the model's tensors with only `expert_ids` of the routed experts (all
    when None), from the headers named by `wm` (loader.weight_map). Checks names, shapes and, for
    FP8 checkpoints, dtypes and scales; raises CheckpointError naming the tensor and file.
    quant: the FP8 config; None reads it from the directory's config.json (fp8.read_quant_config).
    only_routed_experts: plan the routed experts' reads alone (a live rebalance's new slots)."""
    path = Path(path)
    quant = quant if quant is not None else read_quant_config(path)
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in wm) else ""
    E = cfg.text.num_local_experts
    experts = sorted(set(range(E) if expert_ids is None else expert_ids))
    if any(not 0 <= e < E for e in experts):
        raise CheckpointError(f"expert ids {experts} out of range for {E} experts")
    runs = tuple(expert_runs(experts))
    heads = _Headers(path, wm)
    expected = [(prefix + n, n, s) for n, s in expected_text_tensors(cfg.text).items()] if include_text else []
    if include_vision:
        expected += [(n, n, s) for n, s in expected_vision_tensors(cfg).items()]
    if only_routed_experts:
        expected = [x for x in expected if is_routed_expert(x[1])]
    plan = ReadPlan()
    for disk, target, shape in expected:
        if is_routed_expert(target):
            plan.shapes[target] = (len(experts),) + tuple(shape[1:])
            plan.reads += _expert_reads(heads, quant, disk, target, shape, experts, runs)
            continue
        plan.shapes[target] = tuple(shape)
        found = heads.entry(disk)
        if found is None:
            raise CheckpointError(f"{disk}: missing tensor (looked in {sorted(set(wm.values()))})")
        fname, entry = found
        if entry.shape != tuple(shape):
            raise _shape_error(disk, entry.shape, fname, shape)
        plan.reads += _whole_reads(heads, quant, target, disk, fname, entry)
    return plan


def _whole_reads(heads: _Headers, quant: Fp8Config | None, target: str, disk: str, fname: str, entry: TensorEntry,
                 expert: int | None = None, part: str | None = None) -> list[TensorRead]:
    """The read of one whole on-disk tensor, followed by its weight_scale read when the FP8
    config quantizes its module; checks that the stored dtype agrees with the config."""
    read = TensorRead(target, disk, fname, None, ((entry.start, entry.end),), expert, part)
    module, _, param = disk.rpartition(".")
    group = None
    if quant is not None and param == "weight":
        group = quant.group_of(module, module_classes(module, len(entry.shape)))
    if group is None:
        if entry.dtype == FP8_DTYPE:
            why = ("config.json has no quantization_config" if quant is None
                   else f"config.json's quantization_config does not quantize {module} (ignored or not targeted)")
            raise CheckpointError(f"{disk}: stored as {FP8_DTYPE} in {fname}, but {why}")
        return [read]
    if entry.dtype != FP8_DTYPE:
        raise CheckpointError(f"{disk}: stored as {entry.dtype} in {fname}, but config.json's quantization_config "
                              f"(group {group.name}) quantizes {module}: expected {FP8_DTYPE} with a weight_scale")
    if len(entry.shape) != 2:
        raise CheckpointError(f"{disk}: FP8 weight of shape {entry.shape} in {fname}; FP8 weights are 2-D (out, in)")
    scale = disk + SCALE_SUFFIX
    found = heads.entry(scale)
    if found is None:
        raise CheckpointError(f"{scale}: missing tensor (the scale of the FP8 weight {disk} in {fname})")
    sfile, sentry = found
    if sentry.dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{scale}: dtype {sentry.dtype} in {sfile}; weight scales are F32, BF16 or F16")
    check_scale_shape(scale, sentry.shape, sfile, entry.shape, group.weight_strategy)
    return [read, TensorRead(target, scale, sfile, None, ((sentry.start, sentry.end),), expert, part, "scale")]


def _expert_reads(heads: _Headers, quant: Fp8Config | None, disk: str, target: str, shape, experts: list[int],
                  runs) -> list[TensorRead]:
    found = heads.entry(disk)
    if found is not None:   # fused (E, ...): the owned rows only
        fname, entry = found
        if entry.shape != tuple(shape):
            raise _shape_error(disk, entry.shape, fname, shape)
        if entry.dtype == FP8_DTYPE:
            raise CheckpointError(f"{disk}: fused experts stored as {FP8_DTYPE} in {fname}; FP8 experts load only "
                                  "in compressed-tensors' layout, one Linear per expert "
                                  "(experts.{e}.{gate,up,down}_proj.weight with .weight_scale)")
        return [TensorRead(target, disk, fname, runs, tuple(entry.row_range(a, b) for a, b in runs))]
    first = split_expert_names(disk, experts[0] if experts else 0)
    if not any(n in heads.wm for n in first.values()):
        raise CheckpointError(f"{disk}: missing tensor (neither fused nor split experts such as "
                              f"{first['gate_proj']} are in the checkpoint)")
    C, inter = (shape[1], shape[2] // 2) if disk.endswith("gate_up_proj") else (shape[2], shape[1])
    parts = {"gate_proj": (inter, C), "up_proj": (inter, C)} if disk.endswith("gate_up_proj") \
        else {"down_proj": (C, inter)}
    reads = []
    for e in experts:
        names = split_expert_names(disk, e)
        for part, want in parts.items():
            got = heads.entry(names[part])
            if got is None:
                raise CheckpointError(f"{names[part]}: missing tensor (expert {e} of {disk} in the split layout)")
            fname, entry = got
            if entry.shape != want:
                raise CheckpointError(f"{names[part]}: shape {entry.shape} in {fname} does not match the "
                                      f"config's expert shape {want}")
            reads += _whole_reads(heads, quant, target, names[part], fname, entry, e, part)
    return reads

