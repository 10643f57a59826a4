"""Quantizes a generated checkpoint's routed experts to FP8 through the compressed-tensors library,
in the layout of the official Llama-4-Maverick-...-FP8 release (fp8.py describes it).

The library works on modules, as llm-compressor drives it: the on-disk tensors are mounted as a
tree of nn.Linear modules under their checkpoint names, compressed-tensors' FP8_DYNAMIC preset
(FP8 weights with per-channel scales, dynamic per-token activations) is applied to the `Linear`
target with every module but the per-expert projections in `ignore`, each weight scale comes
from the library's min-max rule (calculate_qparams over the weight's rows, what llm-compressor's
"minmax" observer computes), and ModelCompressor compresses the modules to the "float-quantized"
format and writes config.json's quantization_config (with its explicit per-module ignore list).
"""

from __future__ import annotations

import re

import torch
from torch import nn

FP8_FORMAT = "float-quantized"
FP8_PRESET = "FP8_DYNAMIC"
_EXPERT_MODULE = re.compile(r".*feed_forward\.experts\.\d+\.(gate|up|down)_proj$")


def _linear_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint names of the Linear modules: every 2-D `.weight` but the token embedding."""
    return [n[: -len(".weight")] for n, t in tensors.items()
            if n.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in n]


def _mount(tensors: dict[str, torch.Tensor], modules: list[str]) -> nn.Module:
    """A module tree holding each Linear under its checkpoint name (weights shared, not copied)."""
    root = nn.Module()
    for name in modules:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        w = tensors[name + ".weight"]
        bias = tensors.get(name + ".bias")
        with torch.device("meta"):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        parent.add_module(leaf, lin)
    return root


def quantize_experts_fp8(tensors: dict[str, torch.Tensor]):
    """On-disk tensors with split experts (writer._tensors, experts_layout="split") -> (the
    tensors with every `experts.{e}.{gate,up,down}_proj.weight` FP8 and its `.weight_scale`
    beside it, the compressed-tensors ModelCompressor whose update_config(dir) writes the
    quantization_config into config.json)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams

    modules = _linear_modules(tensors)
    experts = [m for m in modules if _EXPERT_MODULE.match(m)]
    if not experts:
        raise ValueError("no per-expert Linear weights to quantize: write the experts split")
    root = _mount(tensors, modules)
    scheme = preset_name_to_scheme(FP8_PRESET, ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                ignore=[m for m in modules if not _EXPERT_MODULE.match(m)])
    apply_quantization_config(root, config, show_progress=False)
    for name in experts:
        lin = root.get_submodule(name)
        w = lin.weight.detach()
        scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), scheme.weights)
        lin.weight_scale.data.copy_(scale)                     # (N, 1)
    compressor = ModelCompressor.from_pretrained_model(root, quantization_format=FP8_FORMAT)
    compressor.compress_model(root)
    out: dict[str, torch.Tensor] = {}
    quantized = set(experts)
    for name, t in tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in quantized:
            lin = root.get_submodule(module)
            out[name] = lin.weight.detach().contiguous()
            out[module + ".weight_scale"] = lin.weight_scale.detach().contiguous()
        else:
            out[name] = t
    return out, compressor
