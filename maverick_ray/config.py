"""Validated configuration objects.

`ModelConfig` is built from a checkpoint's ``config.json``: either the Hugging Face
``Llama4Config`` form (``text_config`` + ``vision_config``) or a bare text config
(``model_type: llama4_text``). Inconsistent shapes fail here, at load, with a
`ConfigError` that names the field, instead of deep inside torch later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .knobs import check_choices, knob


class ConfigError(ValueError):
    """A config.json value is missing, of the wrong type, or inconsistent with another."""


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def _positive_int(d: dict, name: str, prefix: str) -> int:
    value = d.get(name)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             prefix + name, f"must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # routed and shared expert width
    intermediate_size_mlp: int      # dense-layer MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = RoPE layer, 0 = NoPE layer
    use_qk_norm: bool
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_chunk_size: int | None
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def is_moe(self) -> tuple[bool, ...]:
        moe = set(self.moe_layers)
        return tuple(i in moe for i in range(self.num_hidden_layers))

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> "TextConfig":
        p = prefix
        hidden = _positive_int(d, "hidden_size", p)
        heads = _positive_int(d, "num_attention_heads", p)
        layers = _positive_int(d, "num_hidden_layers", p)
        kv_heads = d.get("num_key_value_heads") or heads
        _require(isinstance(kv_heads, int) and kv_heads > 0, p + "num_key_value_heads",
                 f"must be a positive integer, got {kv_heads!r}")
        _require(heads % kv_heads == 0, p + "num_key_value_heads",
                 f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or hidden // heads
        _require(isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0, p + "head_dim",
                 f"must be a positive even integer (RoPE rotates pairs), got {head_dim!r}")
        experts = _positive_int(d, "num_local_experts", p)
        top_k = d.get("num_experts_per_tok", 1)
        _require(isinstance(top_k, int) and 1 <= top_k <= experts, p + "num_experts_per_tok",
                 f"must be between 1 and num_local_experts ({experts}), got {top_k!r}")
        act = d.get("hidden_act", "silu")
        _require(act == "silu", p + "hidden_act", f"only 'silu' is supported, got {act!r}")
        _require(not d.get("attention_bias", False), p + "attention_bias",
                 "Llama 4 attention has no biases; attention_bias=true is not supported")
        _require(not d.get("tie_word_embeddings", False), p + "tie_word_embeddings",
                 "Llama 4 keeps a separate lm_head; tied input and output embeddings are not supported")

        moe_layers = d.get("moe_layers")
        if moe_layers is None:
            step = d.get("interleave_moe_layer_step", 1)
            _require(isinstance(step, int) and step > 0, p + "interleave_moe_layer_step",
                     f"must be a positive integer, got {step!r}")
            moe_layers = list(range(step - 1, layers, step))
        _require(all(isinstance(i, int) and 0 <= i < layers for i in moe_layers), p + "moe_layers",
                 f"every index must be in [0, {layers}), got {moe_layers!r}")

        no_rope = d.get("no_rope_layers") or []
        if not no_rope:
            interval = d.get("no_rope_layer_interval", 4)
            no_rope = [int((i + 1) % interval != 0) for i in range(layers)]
        _require(len(no_rope) >= layers and all(v in (0, 1) for v in no_rope), p + "no_rope_layers",
                 f"needs one 0/1 entry per layer ({layers}), got {no_rope!r}")

        theta, scaling = _parse_rope(d, p)
        chunk = d.get("attention_chunk_size")
        _require(chunk is None or (isinstance(chunk, int) and chunk > 0), p + "attention_chunk_size",
                 f"must be a positive integer or null, got {chunk!r}")
        floor_scale = d.get("floor_scale", 8192)
        _require(isinstance(floor_scale, (int, float)) and floor_scale > 0, p + "floor_scale",
                 f"must be positive, got {floor_scale!r}")
        inter = _positive_int(d, "intermediate_size", p)
        inter_mlp = d.get("intermediate_size_mlp", inter)
        _require(isinstance(inter_mlp, int) and inter_mlp > 0, p + "intermediate_size_mlp",
                 f"must be a positive integer, got {inter_mlp!r}")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=_positive_int(d, "vocab_size", p),
            hidden_size=hidden,
            intermediate_size=inter,
            intermediate_size_mlp=inter_mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            moe_layers=tuple(sorted(set(moe_layers))),
            no_rope_layers=tuple(int(v) for v in no_rope[:layers]),
            use_qk_norm=bool(d.get("use_qk_norm", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_chunk_size=chunk,
            attn_temperature_tuning=bool(d.get("attn_temperature_tuning", True)),
            floor_scale=float(floor_scale),
            attn_scale=float(d.get("attn_scale", 0.1)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )


def _parse_rope(d: dict, p: str) -> tuple[float, RopeScaling | None]:
    """Accepts both the transformers 4.x form (rope_theta + rope_scaling) and 5.x (rope_parameters)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if params and not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    theta = params.get("rope_theta", d.get("rope_theta", 500000.0))
    _require(isinstance(theta, (int, float)) and theta > 0, p + "rope_theta", f"must be positive, got {theta!r}")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    _require(kind == "llama3", p + "rope_scaling.rope_type", f"only 'llama3' scaling is supported, got {kind!r}")
    try:
        rs = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{p}rope_scaling.{e.args[0]}: missing for llama3 RoPE scaling") from None
    _require(rs.factor > 0, p + "rope_scaling.factor", "must be positive")
    _require(rs.high_freq_factor >= rs.low_freq_factor, p + "rope_scaling.high_freq_factor",
             "must be >= low_freq_factor")
    return float(theta), rs


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    norm_eps: float
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    multi_modal_projector_bias: bool = False

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Patch tokens one tile contributes to the prompt after pixel shuffle."""
        return int(self.patches_per_side ** 2 * self.pixel_shuffle_ratio ** 2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "vision_config.") -> "VisionConfig":
        p = prefix
        hidden = _positive_int(d, "hidden_size", p)
        heads = _positive_int(d, "num_attention_heads", p)
        _require(hidden % heads == 0, p + "hidden_size",
                 f"must be divisible by num_attention_heads ({heads}), got {hidden}")
        image = d.get("image_size", 448)
        patch = d.get("patch_size", 14)
        image = image[0] if isinstance(image, (list, tuple)) else image
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        _require(isinstance(image, int) and isinstance(patch, int) and patch > 0 and image % patch == 0,
                 p + "image_size", f"must be a multiple of patch_size ({patch}), got {image}")
        ratio = float(d.get("pixel_shuffle_ratio", 0.5))
        side = image // patch
        _require(math.isclose(side * ratio, round(side * ratio)), p + "pixel_shuffle_ratio",
                 f"{ratio} does not divide the {side}x{side} patch grid evenly")
        rope = d.get("rope_parameters") or {}
        inter = _positive_int(d, "intermediate_size", p)
        _require(inter * ratio * ratio == hidden, p + "intermediate_size",
                 f"the pixel-shuffled width hidden_size/ratio^2 = {hidden / ratio ** 2:g} feeds the adapter, "
                 f"but intermediate_size is {inter}")
        proj_in, proj_out = _positive_int(d, "projector_input_dim", p), _positive_int(d, "projector_output_dim", p)
        _require(proj_in == proj_out, p + "projector_output_dim",
                 f"must equal projector_input_dim ({proj_in}), got {proj_out}")
        out_dim = _positive_int(d, "vision_output_dim", p)
        _require(out_dim == proj_out, p + "vision_output_dim",
                 f"must equal projector_output_dim ({proj_out}) (the projector's input), got {out_dim}")
        return cls(
            hidden_size=hidden,
            num_hidden_layers=_positive_int(d, "num_hidden_layers", p),
            num_attention_heads=heads,
            intermediate_size=inter,
            image_size=image,
            patch_size=patch,
            num_channels=int(d.get("num_channels", 3)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            pixel_shuffle_ratio=ratio,
            projector_input_dim=proj_in,
            projector_output_dim=proj_out,
            vision_output_dim=out_dim,
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            multi_modal_projector_bias=bool(d.get("multi_modal_projector_bias", False)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about a checkpoint's architecture."""

    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None   # <|patch|>

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        _require(isinstance(d, dict), "config.json", "must hold a JSON object")
        _require(not d.get("tie_word_embeddings", False), "tie_word_embeddings",
                 "Llama 4 keeps a separate lm_head; tied input and output embeddings are not supported")
        if "text_config" in d:
            text_d = d["text_config"]
            _require(isinstance(text_d, dict), "text_config", "must be an object")
            text = TextConfig.from_dict(text_d, "text_config.")
            vision_d = d.get("vision_config")
            vision = VisionConfig.from_dict(vision_d) if vision_d else None
            if vision is not None:
                _require(vision.projector_output_dim > 0, "vision_config.projector_output_dim", "must be positive")
            return cls(text=text, vision=vision, image_token_id=d.get("image_token_index", d.get("image_token_id")))
        mt = d.get("model_type", "llama4_text")
        _require(mt in ("llama4_text", "llama4"), "model_type", f"expected a Llama 4 config, got {mt!r}")
        return cls(text=TextConfig.from_dict(d))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads ``config.json`` in a checkpoint directory (or the file itself)."""
        p = Path(path)
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.exists():
            raise ConfigError(f"config.json: not found at {cfg_file}")
        try:
            data = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config.json: not valid JSON ({cfg_file}: {e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {cfg_file})") from None


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


@dataclass(frozen=True)
class ParallelConfig:
    """How the expert-parallel group is laid out over the Ray cluster. Each field is a knob
    (maverick_ray/knobs.py): the CLI flags and the Serve app's args are derived from it."""

    ep_size: int = knob(1, "expert-parallel ranks; N > 1 runs N Ray worker actors, each holding 1/N of the "
                           "routed experts", flag="--ep")
    placement_strategy: str = knob("PACK", "Ray placement-group strategy for the EP workers: PACK on one node, "
                                           "SPREAD/STRICT_SPREAD across nodes", choices=PLACEMENT_STRATEGIES)
    num_gpus_per_worker: float = knob(0, "GPUs per EP worker (1 on GPU clusters, 0 on CPU)",
                                      flag="--gpus-per-worker")
    num_cpus_per_worker: float = knob(1, "CPUs per EP worker", flag="--cpus-per-worker")
    expert_owner: tuple[int, ...] | None = knob(
        None, "expert -> rank map (a list with one rank per routed expert); null = contiguous blocks", cli=False)
    redundant_experts: int = knob(0, "extra expert slots over all EP ranks, holding copies of the busiest experts (of "
                                     "the init_expert_location load; without one, experts 0..N-1); experts + N must "
                                     "divide evenly by ep_size. EP > 1 only")
    init_expert_location: str = knob("", "an expert-load file recorded from real traffic (maverick-ray record-load): "
                                         "start with the balanced placement the EPLB policy computes from it. EP > 1 "
                                         "only; empty: contiguous blocks of experts")
    eplb: str = knob("off", "live expert rebalancing: on moves experts between ranks (and redundant copies between "
                            "experts) while serving, when the measured imbalance passes eplb_min_imbalance; EP > 1 only",
                     choices=("on", "off"))
    eplb_window_steps: int = knob(1000, "steps of routing the live rebalancer measures the load over")
    eplb_interval_steps: int = knob(3000, "fewest steps between two live rebalances")
    eplb_min_imbalance: float = knob(1.15, "busiest rank's tokens over the mean (summed over MoE layers) from which "
                                           "a live rebalance runs")
    spare_ranks: int = knob(1, "pre-started idle rank processes per node (no weights, no Ray resources, imports "
                               "done) that replace a failed rank without a new Ray worker start: recovery "
                               "takes ~1 s instead of ~4 s. 0: none. EP > 1 only")
    worker_resources: dict[str, float] | None = knob(
        None, "extra Ray resources each EP worker bundle asks for, e.g. {expert_host: 1} to keep the expert "
              "shards on nodes started with ray start --resources='{\"expert_host\": 4}'", cli=False)

    def __post_init__(self):
        _require(isinstance(self.ep_size, int) and self.ep_size >= 1, "ep_size",
                 f"must be a positive integer, got {self.ep_size!r}")
        check_choices(self)
        _require(isinstance(self.redundant_experts, int) and self.redundant_experts >= 0, "redundant_experts",
                 f"must be a non-negative integer, got {self.redundant_experts!r}")
        _require(isinstance(self.init_expert_location, str), "init_expert_location",
                 f"must be a file path (or empty), got {self.init_expert_location!r}")
        for name in ("eplb_window_steps", "eplb_interval_steps"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     f"must be a positive integer, got {getattr(self, name)!r}")
        _require(isinstance(self.eplb_min_imbalance, (int, float)) and self.eplb_min_imbalance >= 1.0,
                 "eplb_min_imbalance", f"is max / mean tokens per rank, at least 1.0; got {self.eplb_min_imbalance!r}")
        _require(isinstance(self.spare_ranks, int) and self.spare_ranks >= 0, "spare_ranks",
                 f"must be a non-negative integer, got {self.spare_ranks!r}")
        _require(self.num_gpus_per_worker >= 0 and self.num_cpus_per_worker >= 0, "num_gpus_per_worker",
                 "resources must be non-negative")
        extra = self.worker_resources or {}
        _require(isinstance(extra, dict) and all(isinstance(k, str) and k not in ("CPU", "GPU")
                                                 and isinstance(v, (int, float)) and v > 0
                                                 for k, v in extra.items()),
                 "worker_resources", f"must map custom resource names to positive amounts "
                 f"(CPU/GPU have their own fields), got {self.worker_resources!r}")

    def worker_bundle(self) -> dict[str, float]:
        """The Ray resources of one EP worker's placement-group bundle."""
        bundle = {"CPU": self.num_cpus_per_worker}
        if self.num_gpus_per_worker:
            bundle["GPU"] = self.num_gpus_per_worker
        bundle.update(self.worker_resources or {})
        return bundle


@dataclass(frozen=True)
class EngineConfig:
    """Capacity, numerics, timeouts and prompt rendering of one engine (one Serve replica). Each field is a knob
    (maverick_ray/knobs.py): the CLI flags and the Serve app's args are derived from it."""

    max_num_seqs: int = knob(32, "concurrent sequences per EP rank")
    max_model_len: int = knob(0, "prompt + output tokens of one sequence. 0: the checkpoint's context "
                                 "(max_position_embeddings), capped by what the KV cache holds for one sequence")
    max_waiting: int = knob(1024, "queued requests beyond which new ones are refused (HTTP 503)")
    max_prefill_tokens: int = knob(4096, "prompt tokens each rank runs per step: longer prompts are prefilled in "
                                         "chunks over several steps while running sequences keep decoding")
    max_decode_slowdown: float = knob(2.0, "while sequences decode, a step that also prefills may take at most this "
                                           "many times a decode-only step (measured online): the prompt tokens per "
                                           "step shrink to fit (at least min_prefill_chunk, at most max_prefill_tokens). Keeps "
                                           "inter-token gaps steady while long prompts arrive, at the cost of their "
                                           "time to first token. 0: no pacing, every step takes max_prefill_tokens")
    min_prefill_chunk: int = knob(1, "the fewest prompt tokens a paced step runs: a prompt advances at least this "
                                     "much per step even where that takes the step past max_decode_slowdown. Higher "
                                     "prefills long prompts faster under load at the cost of bumpier streams beside "
                                     "them (beside a 16k prompt on a 2-core CPU, 16 instead of 1: its prefill 0.4x "
                                     "the time, the streams' p99 gaps 2.2-2.4x instead of 1.3-1.6x; BENCHMARKS.md)")
    kv_cache_memory_gb: float = knob(0.0, "KV cache memory per rank, GiB. 0: on GPU kv_cache_fraction of the "
                                          "memory free after the weights; on CPU room for max_num_seqs sequences "
                                          "of min(max_model_len, 2048) tokens")
    kv_cache_fraction: float = knob(0.9, "on GPU with kv_cache_memory_gb 0: the fraction of free device memory "
                                         "(after the weights) the KV cache takes")
    kv_block_size: int = knob(16, "tokens per KV cache block (page)")
    prefix_caching: str = knob("on", "reuse the KV blocks of a prompt prefix computed before (shared system "
                                     "prompts, multi-turn chats, the same image): on or off",
                               choices=("on", "off"))
    dtype: str = knob("auto", "weights and activations (auto: float32 on CPU, bfloat16 on GPU)",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("auto", "where the ranks compute (auto: cuda when the worker has a GPU, else cpu)",
                       choices=("auto", "cpu", "cuda"))
    step_timeout_s: float = knob(120.0, "the most seconds any step may take before its ranks count as hung (the "
                                        "deadline until the first steps are measured, and the ceiling after)")
    step_deadline_factor: float = knob(10.0, "a step's deadline is this many times what recent steps took for its "
                                             "tokens (p99), within [step_deadline_floor_s, step_timeout_s]")
    step_deadline_floor_s: float = knob(15.0, "the shortest deadline a step gets, whatever recent steps took "
                                              "(capped at step_timeout_s)")
    max_recoveries: int = knob(3, "times the engine may replace its ranks after a rank died, hung or raised, "
                                  "within recovery_window_s, before it reports unhealthy (0: fail-stop)")
    recovery_window_s: float = knob(600.0, "the window max_recoveries counts over")
    request_deadline_s: float = knob(0.0, "seconds from arrival (time queued included) after which a request is "
                                          "ended with a timeout error and its KV pages freed; a request's own "
                                          "`timeout` may only shorten it. 0: no deadline")
    fp8_experts: str = knob("auto", "FP8 checkpoints (compressed-tensors): auto keeps the routed experts FP8 and "
                                    "runs them as FP8 matmuls on GPUs that have them (compute capability 8.9+, "
                                    "e.g. H100), else dequantizes them at load; on: keep them FP8 on any device "
                                    "(slow on CPU); off: always dequantize", choices=("auto", "on", "off"))
    cpu_kernels: str = knob("auto", "auto: compile (once, ~1 s, needs a C compiler) and use the native CPU "
                                    "kernels for the routed experts of decode steps and for RMSNorm, falling back "
                                    "to torch when it cannot; off: torch only", choices=("auto", "off"))
    cuda_graphs: str = knob("auto", "auto: decode steps on one GPU (EP = 1) replay CUDA graphs, one captured per "
                                    "batch-size and context bucket on first use, instead of launching each op "
                                    "from Python (needs routed experts as grouped GEMMs: Hopper, bf16 or FP8); "
                                    "off: every step dispatches its ops", choices=("auto", "off"))
    cpu_collectives: str = knob("auto", "how CPU expert-parallel ranks exchange tokens. auto: through shared "
                                        "memory when every rank can map one segment (ranks on one host), else "
                                        "gloo over TCP; gloo: always gloo", choices=("auto", "gloo"))
    chat_template: str = knob("", "Jinja chat template (a file, or the template text) rendering chat prompts "
                                  "instead of the checkpoint's own; empty: the checkpoint's (tokenizer_config.json, "
                                  "chat_template.jinja or chat_template.json)")

    def __post_init__(self):
        for name in ("max_num_seqs", "max_waiting", "max_prefill_tokens", "min_prefill_chunk", "kv_block_size"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        _require(isinstance(self.max_model_len, int) and self.max_model_len >= 0, "max_model_len",
                 f"must be a positive integer, or 0 for the checkpoint's context; got {self.max_model_len!r}")
        _require(math.isfinite(self.kv_cache_memory_gb) and self.kv_cache_memory_gb >= 0, "kv_cache_memory_gb",
                 f"must be a number of GiB >= 0 (0: automatic), got {self.kv_cache_memory_gb!r}")
        _require(math.isfinite(self.max_decode_slowdown) and (self.max_decode_slowdown == 0
                                                              or self.max_decode_slowdown > 1),
                 "max_decode_slowdown", f"must be 0 (no pacing) or a factor > 1, got {self.max_decode_slowdown!r}")
        _require(0 < self.kv_cache_fraction <= 1, "kv_cache_fraction", f"must be in (0, 1], got {self.kv_cache_fraction}")
        _require(isinstance(self.max_recoveries, int) and self.max_recoveries >= 0, "max_recoveries",
                 f"must be a non-negative integer, got {self.max_recoveries!r}")
        _require(self.recovery_window_s > 0, "recovery_window_s", "must be positive")
        check_choices(self)
        _require(self.step_timeout_s > 0, "step_timeout_s", "must be positive")
        _require(math.isfinite(self.request_deadline_s) and self.request_deadline_s >= 0, "request_deadline_s",
                 f"must be a number of seconds >= 0 (0: no deadline), got {self.request_deadline_s!r}")
        _require(self.step_deadline_floor_s > 0, "step_deadline_floor_s", "must be positive")
        _require(self.step_deadline_factor >= 1, "step_deadline_factor",
                 f"must be at least 1, got {self.step_deadline_factor}")
