"""FP8 checkpoints in the compressed-tensors layout: what config.json's `quantization_config`
says, which modules it quantizes, and turning their FP8 weights back into floats.

The layout (compressed-tensors' "float-quantized" format, the one llm-compressor writes for the
FP8_DYNAMIC scheme and the official Llama-4-Maverick-...-FP8 release uses). Each quantized Linear
module M stores

    M.weight        float8_e4m3fn (N, K)      N output features, K input features
    M.weight_scale  float (N, 1)              strategy "channel": one scale per output row
                    float (1,)                strategy "tensor": one scale
    W = M.weight.float() * M.weight_scale     symmetric: no zero point

Activations (input_activations: dynamic, strategy "token") are quantized at run time, one scale
per token; nothing of them is stored. Routed experts are stored one Linear per expert
(`feed_forward.experts.{e}.{gate,up,down}_proj`). Modules that `ignore` names (exactly, or a
"re:" regex matched from the start of the name, or a class name) keep their stored precision.
A module is quantized when some config group's `targets` match it (same three forms) and
`ignore` does not: compressed-tensors' own rule (compressed_tensors.utils.match.is_match).

The names below are compressed-tensors' (CompressionFormat, QuantizationStrategy, ...); the
tests check them against the library. This module does not import it: rank workers load
checkpoints without it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

QUANT_METHOD = "compressed-tensors"
# CompressionFormat values whose weights are stored as a plain FP8 tensor plus a scale.
FP8_FORMATS = ("float-quantized", "naive-quantized")
WEIGHT_STRATEGIES = ("channel", "tensor")        # QuantizationStrategy values this loader reads
ACTIVATION_STRATEGIES = ("token", "tensor")      # dynamic input scales; both run as per-token
FP8_DTYPE = "F8_E4M3"                            # safetensors' name for torch.float8_e4m3fn
SCALE_SUFFIX = "_scale"                          # weight -> weight_scale


@dataclass(frozen=True)
class Fp8Group:
    """One config group: the modules it targets and how their weights are quantized."""

    name: str
    targets: tuple[str, ...]
    weight_strategy: str              # "channel" | "tensor"
    activation_strategy: str | None   # "token" | "tensor" (dynamic), None: weight-only


@dataclass(frozen=True)
class Fp8Config:
    """The checkpoint's quantization_config, checked to be FP8 weights this loader can read."""

    format: str
    groups: tuple[Fp8Group, ...]
    ignore: tuple[str, ...]

    @classmethod
    def from_dict(cls, qc: object) -> "Fp8Config":
        """Parses config.json's `quantization_config`; raises CheckpointError for anything other
        than compressed-tensors FP8 (float8_e4m3fn) weights with channel or tensor scales."""
        where = "config.json quantization_config"
        if not isinstance(qc, dict):
            raise CheckpointError(f"{where}: expected an object, got {type(qc).__name__}")
        method = qc.get("quant_method")
        if method != QUANT_METHOD:
            raise CheckpointError(f"{where}: quant_method {method!r} is not supported "
                                  f"(only {QUANT_METHOD!r} FP8 checkpoints load)")
        fmt = qc.get("format")
        if fmt not in FP8_FORMATS:
            raise CheckpointError(f"{where}: format {fmt!r} is not supported (FP8 weights load from "
                                  f"{' or '.join(FP8_FORMATS)})")
        if qc.get("kv_cache_scheme"):
            raise CheckpointError(f"{where}: kv_cache_scheme is set; a quantized KV cache is not supported")
        if qc.get("sparsity_config"):
            raise CheckpointError(f"{where}: sparsity_config is set; sparse checkpoints are not supported")
        if qc.get("transform_config"):
            raise CheckpointError(f"{where}: transform_config is set; transformed weights are not supported")
        groups_raw = qc.get("config_groups")
        if not isinstance(groups_raw, dict) or not groups_raw:
            raise CheckpointError(f"{where}: config_groups is missing or empty")
        groups = tuple(_parse_group(f"{where}.config_groups.{name}", name, g, fmt) for name, g in groups_raw.items())
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise CheckpointError(f"{where}: ignore must be a list of module names")
        return cls(fmt, groups, tuple(ignore))

    def group_of(self, module: str, classes: tuple[str, ...] = ("Linear",)) -> Fp8Group | None:
        """The group that quantizes `module` (a checkpoint module name, e.g.
        `language_model.model.layers.1.feed_forward.experts.3.gate_proj`), None when none does
        or `ignore` keeps it. `classes`: the module's class names (Llama 4's Linear modules
        are "Linear"; the router is also "Llama4Router")."""
        if any(_matches(module, classes, t) for t in self.ignore):
            return None
        return next((g for g in self.groups if any(_matches(module, classes, t) for t in g.targets)), None)


def _parse_group(where: str, name: str, g: object, fmt: str) -> Fp8Group:
    if not isinstance(g, dict):
        raise CheckpointError(f"{where}: expected an object")
    if g.get("format") not in (None, *FP8_FORMATS):
        raise CheckpointError(f"{where}: format {g.get('format')!r} is not supported")
    targets = g.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{where}: targets must be a non-empty list of names")
    w = g.get("weights")
    if not isinstance(w, dict):
        raise CheckpointError(f"{where}: has no weights scheme (only weight-quantized FP8 loads)")
    _check_fp8_args(f"{where}.weights", w)
    if w.get("dynamic"):
        raise CheckpointError(f"{where}.weights: dynamic weight scales are not supported")
    if w.get("strategy") not in WEIGHT_STRATEGIES:
        raise CheckpointError(f"{where}.weights: strategy {w.get('strategy')!r} is not supported "
                              f"(supported: {', '.join(WEIGHT_STRATEGIES)})")
    if w.get("group_size") is not None or w.get("block_structure") is not None:
        raise CheckpointError(f"{where}.weights: group or block scales are not supported")
    a = g.get("input_activations")
    act = None
    if a is not None:
        _check_fp8_args(f"{where}.input_activations", a)
        if a.get("dynamic") is not True or a.get("strategy") not in ACTIVATION_STRATEGIES:
            raise CheckpointError(f"{where}.input_activations: only dynamic per-token or per-tensor "
                                  f"scales are supported (got dynamic={a.get('dynamic')!r}, "
                                  f"strategy={a.get('strategy')!r})")
        act = a["strategy"]
    if g.get("output_activations") is not None:
        raise CheckpointError(f"{where}: output_activations quantization is not supported")
    return Fp8Group(name, tuple(targets), w["strategy"], act)


def _check_fp8_args(where: str, args: object) -> None:
    if not isinstance(args, dict):
        raise CheckpointError(f"{where}: expected an object")
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise CheckpointError(f"{where}: num_bits={args.get('num_bits')!r}, type={args.get('type')!r} is not "
                              "FP8 (this loader reads num_bits=8, type='float')")
    if args.get("symmetric") is False:
        raise CheckpointError(f"{where}: asymmetric (zero-point) quantization is not supported")


def _matches(module: str, classes: tuple[str, ...], target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target in classes


def read_quant_config(path: str | Path) -> Fp8Config | None:
    """The FP8 config of a checkpoint directory's config.json; None when the directory has no
    config.json or it has no quantization_config."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return None
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config.json: not valid JSON ({e})") from None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return None if qc is None else Fp8Config.from_dict(qc)


def module_classes(module: str, weight_ndim: int) -> tuple[str, ...]:
    """Class names of the Llama 4 module that owns a `weight` of `weight_ndim` dims, as
    compressed-tensors matches targets against them (the class and its bases)."""
    if module.endswith("embed_tokens"):
        return ("Embedding",)
    if weight_ndim != 2:   # RMSNorm / LayerNorm weights
        return ("LayerNorm",) if module.startswith("vision_model.") else ("Llama4TextRMSNorm",)
    if module.endswith("feed_forward.router"):
        return ("Llama4Router", "Linear")
    return ("Linear",)


def check_scale_shape(scale_name: str, got: tuple[int, ...], fname: str, weight_shape: tuple[int, ...],
                      strategy: str) -> None:
    """Raises CheckpointError unless `got` is the weight_scale shape of a (N, K) weight:
    (N, 1) or (N,) per channel, one element per tensor."""
    n = weight_shape[0]
    ok = got in ((n, 1), (n,)) if strategy == "channel" else (len(got) <= 2 and all(d == 1 for d in got))
    if not ok:
        want = f"({n}, 1)" if strategy == "channel" else "(1,)"
        raise CheckpointError(f"{scale_name}: shape {tuple(got)} in {fname} does not match the {strategy} scale "
                              f"{want} of a weight of shape {tuple(weight_shape)}")


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight (N, K) and its scale ((N, 1), (N,) or one element) -> fp32 (N, K), computed in fp32."""
    s = scale.to(torch.float32)
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
    return weight.to(torch.float32) * s


def channel_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Any stored weight_scale -> fp32 (rows,): one scale per output row (a tensor scale repeated)."""
    s = scale.to(torch.float32).reshape(-1)
    return s.expand(rows).contiguous() if s.numel() == 1 else s
