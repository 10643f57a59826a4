"""FP8 (compressed-tensors) checkpoints: the writer's layout, the loader's FP8 config reading,
per-rank reads with scales, dequantization against the library, engine parity with transformers,
and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from maverick_ray.checkpoint.errors import CheckpointError
from maverick_ray.checkpoint.fp8 import (ACTIVATION_STRATEGIES, FP8_DTYPE, FP8_FORMATS, QUANT_METHOD,
                                         WEIGHT_STRATEGIES, Fp8Config, module_classes, read_quant_config)
from maverick_ray.checkpoint.loader import load_state_dict, weight_map
from maverick_ray.checkpoint.read_plan import plan_reads, read_header
from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.parallel.placement import ExpertPlacement

from engine_helpers import greedy_reference, prompts_for
from fp8_helpers import broken_copy, hf_greedy, write_fp8

EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight(_scale)?$")
RELEASE = Path(__file__).parent.parent / "configs" / "models" / "Llama-4-Maverick-17B-128E-Instruct-FP8.json"


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory) -> Path:
    return write_fp8(tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory) -> Path:
    """The same seed without FP8: the weights the FP8 checkpoint quantized."""
    from maverick_ray.checkpoint.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("fp32"), "tiny", progress=False)


# ---- the writer: the official layout, through compressed-tensors ------------------------------

def test_writer_emits_the_official_compressed_tensors_layout(fp8_ckpt):
    header = read_header(fp8_ckpt / "model.safetensors")
    cfg = ModelConfig.from_pretrained(fp8_ckpt).text
    E, C, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    n_moe = sum(cfg.is_moe)
    experts = {n: e for n, e in header.items() if EXPERT.search(n)}
    assert len(experts) == n_moe * E * 3 * 2                     # weight + weight_scale per projection
    for name, e in experts.items():
        if name.endswith("_scale"):
            rows = C if ".down_proj." in name else inter
            assert (e.dtype, e.shape) == ("F32", (rows, 1)), name  # per-channel, fp32 like the weights' base
        else:
            assert e.dtype == FP8_DTYPE, name
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" == n[-17:] for n in header)  # no fused
    others = {n: e for n, e in header.items() if n not in experts}
    assert {e.dtype for e in others.values()} == {"F32"}         # everything else kept in precision

    qc = json.loads((fp8_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == \
        {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
    # The explicit per-module ignore list: every Linear but the routed experts, as in the release.
    linear = {n[:-len(".weight")] for n, e in others.items()
              if n.endswith(".weight") and len(e.shape) == 2 and "embed_tokens" not in n}
    assert set(qc["ignore"]) == linear
    assert any(m.endswith("feed_forward.router") for m in qc["ignore"])
    assert "language_model.lm_head" in qc["ignore"]


def test_make_checkpoint_fp8_cli(tmp_path, capsys):
    from maverick_ray.cli import main

    assert main(["make-checkpoint", str(tmp_path / "ck"), "--fp8"]) == 0
    assert read_quant_config(tmp_path / "ck") is not None
    header = read_header(tmp_path / "ck" / "model.safetensors")
    assert header["language_model.model.layers.1.feed_forward.experts.0.gate_proj.weight"].dtype == FP8_DTYPE
    assert main(["make-checkpoint", str(tmp_path / "ck2")]) == 0      # without --fp8: no quantization
    assert read_quant_config(tmp_path / "ck2") is None


# ---- reading quantization_config: our rules are the library's -------------------------------

def test_constants_are_compressed_tensors_definitions():
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationStrategy

    formats = {f.value for f in CompressionFormat}
    assert set(FP8_FORMATS) <= formats
    assert CompressionFormat.float_quantized.value in FP8_FORMATS
    strategies = {s.value for s in QuantizationStrategy}
    assert set(WEIGHT_STRATEGIES) <= strategies and set(ACTIVATION_STRATEGIES) <= strategies
    from compressed_tensors.base import QUANTIZATION_METHOD
    assert QUANT_METHOD == QUANTIZATION_METHOD


def test_release_config_parses_and_quantizes_only_the_routed_experts():
    from maverick_ray.checkpoint.names import TEXT_PREFIX, expected_text_tensors, split_expert_names

    raw = json.loads(RELEASE.read_text())
    q = Fp8Config.from_dict(raw["quantization_config"])
    assert q.format == "float-quantized" and q.groups[0].weight_strategy == "channel"
    assert q.groups[0].activation_strategy == "token"
    cfg = ModelConfig.from_dict(raw)
    quantized = []
    for name, shape in expected_text_tensors(cfg.text).items():
        disk = TEXT_PREFIX + name
        if name.endswith(("gate_up_proj", "experts.down_proj")):
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            for p in parts:
                module = split_expert_names(disk, 5)[p][:-len(".weight")]
                assert q.group_of(module, module_classes(module, 2)) is not None, module
            continue
        if name.endswith(".weight"):
            module = disk[:-len(".weight")]
            if q.group_of(module, module_classes(module, len(shape))) is not None:
                quantized.append(module)
    assert quantized == []   # attention, routers, shared experts, dense MLPs, lm_head, norms: kept


def test_module_matching_agrees_with_compressed_tensors(fp8_ckpt):
    """Fp8Config.group_of against the library's is_match, over the tiny checkpoint's modules and
    a config that uses every target form (class, exact name, re: regex) in targets and ignore."""
    from compressed_tensors.utils.match import is_match
    from torch import nn

    from maverick_ray.checkpoint.fp8_writer import _linear_modules

    class Llama4Router(nn.Linear):
        pass

    wm = weight_map(fp8_ckpt)
    shapes = {n: e.shape for n, e in read_header(fp8_ckpt / "model.safetensors").items()}
    modules = [n[:-len(".weight")] for n in wm if n.endswith(".weight")]
    assert set(_linear_modules({n: torch.empty(shapes[n], device="meta") for n in wm})) < set(modules)
    qc = json.loads((fp8_ckpt / "config.json").read_text())["quantization_config"]
    variants = [qc, dict(qc, ignore=["re:.*self_attn\\..*", "language_model.lm_head", "Llama4Router"]),
                dict(qc, ignore=[], config_groups={"g": dict(
                    qc["config_groups"]["group_0"],
                    targets=["re:.*experts\\.\\d+\\.up_proj$", "language_model.model.layers.0.self_attn.q_proj"])})]
    for raw in variants:
        ours = Fp8Config.from_dict(raw)
        targets = [t for g in ours.groups for t in g.targets]
        for m in modules:
            classes = module_classes(m, len(shapes[m + ".weight"]))
            with torch.device("meta"):
                mod = Llama4Router(2, 2) if "Llama4Router" in classes else \
                    nn.Linear(2, 2) if "Linear" in classes else nn.Embedding(2, 2) if "Embedding" in classes \
                    else nn.LayerNorm(2)
            if not isinstance(mod, nn.Linear):
                continue   # compressed-tensors quantizes Linear (and Embedding) modules only
            assert (ours.group_of(m, classes) is not None) == is_match(m, mod, targets, ours.ignore), (m, raw["ignore"])


# ---- loading: dequantized like the library, only this rank's bytes --------------------------

def test_loader_dequantizes_exactly_like_compressed_tensors(fp8_ckpt, fp32_ckpt):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    raw = load_file(str(fp8_ckpt / "model.safetensors"))
    qc = dict(json.loads((fp8_ckpt / "config.json").read_text())["quantization_config"])
    qc.pop("version", None)
    ct = QuantizationConfig.model_validate(qc)
    scheme = ct.config_groups["group_0"]
    decompress = BaseCompressor.get_value_from_registry(ct.format).decompress
    ours = load_state_dict(fp8_ckpt, progress=False)
    clean = load_state_dict(fp32_ckpt, progress=False)
    for layer in (1, 3):
        base = f"language_model.model.layers.{layer}.feed_forward.experts."
        gate_up = ours[f"model.layers.{layer}.feed_forward.experts.gate_up_proj"]   # (E, C, 2I)
        down = ours[f"model.layers.{layer}.feed_forward.experts.down_proj"]          # (E, I, C)
        inter = gate_up.shape[-1] // 2
        for e in range(gate_up.shape[0]):
            lib = {p: decompress({"weight": raw[f"{base}{e}.{p}.weight"],
                                  "weight_scale": raw[f"{base}{e}.{p}.weight_scale"]}, scheme)["weight"]
                   for p in ("gate_proj", "up_proj", "down_proj")}
            assert torch.equal(gate_up[e, :, :inter], lib["gate_proj"].T)
            assert torch.equal(gate_up[e, :, inter:], lib["up_proj"].T)
            assert torch.equal(down[e], lib["down_proj"].T)
        ref = clean[f"model.layers.{layer}.feed_forward.experts.gate_up_proj"]
        err = (gate_up - ref).abs().max()
        assert 0 < err <= ref.abs().max() / 8   # really quantized, within FP8 e4m3's 3-bit mantissa
    for name, t in ours.items():   # everything the config ignores is loaded untouched
        if ".experts." not in name:
            assert torch.equal(t, clean[name]), name


def test_each_rank_reads_only_its_experts_and_their_scales(fp8_ckpt):
    cfg = ModelConfig.from_pretrained(fp8_ckpt)
    t = cfg.text
    C, inter, E, n_moe = t.hidden_size, t.intermediate_size, t.num_local_experts, sum(t.is_moe)
    wm = weight_map(fp8_ckpt)
    placement = ExpertPlacement.contiguous(E, 4)
    seen = []
    for rank in range(4):
        mine = placement.experts_of(rank)
        rp = plan_reads(fp8_ckpt, cfg, wm, mine, include_vision=False)
        expert_reads = [r for r in rp.reads if r.expert is not None]
        assert {r.expert for r in expert_reads} == set(mine)
        for w, s in zip(expert_reads[::2], expert_reads[1::2]):   # every weight read is followed by its scale
            assert (w.kind, s.kind) == ("weight", "scale") and s.disk == w.disk + "_scale"
        assert len(expert_reads) == len(mine) * n_moe * 3 * 2
        # FP8 (1 byte) weights of gate, up (I, C) and down (C, I), plus fp32 scales of 2I + C rows.
        assert sum(r.nbytes for r in expert_reads) == len(mine) * n_moe * (3 * inter * C + 4 * (2 * inter + C))
        seen += [(r.file, a, b) for r in expert_reads for a, b in r.byte_ranges]
    seen.sort()
    assert all(b1 <= a2 for (_, _, b1), (_, a2, _) in zip(seen, seen[1:]))   # no byte read by two ranks


def test_loader_reads_nothing_outside_the_plan(fp8_ckpt, tmp_path):
    """Bytes outside rank 1-of-4's planned ranges (scales included) are overwritten with NaN bits;
    its load still equals a clean load."""
    import shutil

    ck = shutil.copytree(fp8_ckpt, tmp_path / "c")
    cfg = ModelConfig.from_pretrained(ck)
    experts = ExpertPlacement.contiguous(cfg.text.num_local_experts, 4).experts_of(1)
    clean = load_state_dict(fp8_ckpt, expert_ids=experts, progress=False)
    rp = plan_reads(ck, cfg, weight_map(ck), experts)
    f = ck / "model.safetensors"
    raw = bytearray(f.read_bytes())
    pos = 8 + struct.unpack("<Q", raw[:8])[0]
    for a, b in sorted(r for rd in rp.reads for r in rd.byte_ranges) + [(len(raw), len(raw))]:
        raw[pos:a] = b"\xff" * (a - pos)
        pos = max(pos, b)
    f.write_bytes(bytes(raw))
    got = load_state_dict(ck, expert_ids=experts, progress=False)
    assert got.keys() == clean.keys()
    assert all(torch.equal(got[k], clean[k]) for k in got)


def test_keep_fp8_experts_returns_fp8_weights_with_row_scales(fp8_ckpt):
    mine = [4, 5, 6, 7]
    deq = load_state_dict(fp8_ckpt, expert_ids=mine, progress=False, include_vision=False)
    kept = load_state_dict(fp8_ckpt, expert_ids=mine, progress=False, include_vision=False, keep_fp8_experts=True)
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"):
        w, s = kept[name], kept[name + "_scale"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert w.shape == deq[name].transpose(1, 2).shape and s.shape == w.shape[:2]
        assert torch.equal((w.float() * s[:, :, None]).transpose(1, 2), deq[name])
    assert kept.keys() - deq.keys() == {k + "_scale" for k in deq if ".experts." in k}


# ---- parity: our engine = transformers + compressed-tensors, dequantized ----------------------

def test_engine_greedy_equals_transformers_on_the_fp8_checkpoint(fp8_ckpt, fp32_ckpt):
    prompts = prompts_for(fp8_ckpt)
    hf = hf_greedy(fp8_ckpt, prompts, 12, dequantize=True)
    assert greedy_reference(fp8_ckpt, prompts, 12, use_hf=False) == hf
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with Engine(fp8_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_model_len=256)) as eng:
        assert [eng.generate(p, greedy)["token_ids"] for p in prompts] == hf
    # The FP8 weights change the output: the comparison above is not the fp32 model's by accident.
    assert greedy_reference(fp32_ckpt, prompts, 12, use_hf=False) != hf


# ---- broken FP8 checkpoints -------------------------------------------------------------------

W = "language_model.model.layers.1.feed_forward.experts.2.up_proj.weight"


def _drop_scale(t):
    del t[W + "_scale"]


def _scale_shape(t):
    t[W + "_scale"] = torch.ones(t[W].shape[0] + 1, 1)


def _scale_cols(t):
    t[W + "_scale"] = torch.ones(t[W].shape[0], 2)


def _weight_shape(t):
    t[W] = t[W][:-1].contiguous()


def _expert_in_bf16(t):
    t[W] = t[W].float()


def _fp8_in_ignored(t):
    n = "language_model.model.layers.1.self_attn.q_proj.weight"
    t[n] = t[n].to(torch.float8_e4m3fn)


def _scale_int(t):
    t[W + "_scale"] = t[W + "_scale"].to(torch.int32)


def _cfg(**kw):
    def edit(cfg):
        qc = cfg["quantization_config"]
        for path, value in kw.items():
            node = qc
            *keys, last = path.split("__")
            for k in keys:
                node = node[k]
            node[last] = value
    return edit


def _no_qc(cfg):
    del cfg["quantization_config"]


G = "config_groups__group_0__"
BROKEN = {
    "missing scale": (dict(edit_tensors=_drop_scale),
                      rf"{re.escape(W)}_scale: missing tensor .*scale of the FP8 weight"),
    "scale rows": (dict(edit_tensors=_scale_shape),
                   r"_scale: shape \(65, 1\) .* does not match the channel scale \(64, 1\)"),
    "scale columns": (dict(edit_tensors=_scale_cols), r"_scale: shape \(64, 2\) .* channel scale"),
    "scale dtype": (dict(edit_tensors=_scale_int), r"_scale: dtype I32 .* weight scales are F32, BF16 or F16"),
    "weight shape": (dict(edit_tensors=_weight_shape),
                     rf"{re.escape(W)}: shape \(63, 64\) .*expert shape \(64, 64\)"),
    "expert not fp8": (dict(edit_tensors=_expert_in_bf16),
                       rf"{re.escape(W)}: stored as F32 .* quantizes .*expected F8_E4M3"),
    "fp8 but ignored": (dict(edit_tensors=_fp8_in_ignored), r"q_proj.weight: stored as F8_E4M3 .* does not quantize"),
    "fp8 without config": (dict(edit_config=_no_qc), r"stored as F8_E4M3 .* config.json has no quantization_config"),
    "quant method": (dict(edit_config=_cfg(quant_method="awq")), r"quant_method 'awq' is not supported"),
    "format": (dict(edit_config=_cfg(format="pack-quantized")), r"format 'pack-quantized' is not supported"),
    "int weights": (dict(edit_config=_cfg(**{G + "weights__type": "int"})),
                    r"group_0.weights: num_bits=8, type='int' is not FP8"),
    "4 bits": (dict(edit_config=_cfg(**{G + "weights__num_bits": 4})), r"num_bits=4, type='float' is not FP8"),
    "block scales": (dict(edit_config=_cfg(**{G + "weights__strategy": "block"})),
                     r"strategy 'block' is not supported"),
    "group scales": (dict(edit_config=_cfg(**{G + "weights__group_size": 128})), r"group or block scales"),
    "static activations": (dict(edit_config=_cfg(**{G + "input_activations__dynamic": False})),
                           r"only dynamic per-token or per-tensor"),
    "asymmetric": (dict(edit_config=_cfg(**{G + "weights__symmetric": False})), r"asymmetric"),
    "kv cache": (dict(edit_config=_cfg(kv_cache_scheme={"num_bits": 8})), r"kv_cache_scheme"),
    "no groups": (dict(edit_config=_cfg(config_groups={})), r"config_groups is missing or empty"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_fp8_checkpoints_fail_with_a_clear_error(fp8_ckpt, tmp_path, case):
    edits, message = BROKEN[case]
    ck = broken_copy(fp8_ckpt, tmp_path / "bad", **edits)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(ck, progress=False)


def test_fused_fp8_experts_are_refused(tmp_path):
    from maverick_ray.checkpoint.writer import write_checkpoint

    ck = write_checkpoint(tmp_path / "fused", "tiny", progress=False)

    def to_fp8(t):
        n = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
        t[n] = t[n].to(torch.float8_e4m3fn)

    bad = broken_copy(ck, tmp_path / "bad", edit_tensors=to_fp8)
    with pytest.raises(CheckpointError,
                       match=r"experts.gate_up_proj: fused experts stored as F8_E4M3 .* one Linear per expert"):
        load_state_dict(bad, progress=False)
