"""Capacity plan for one expert-parallel engine: what each rank's GPU holds, and whether it fits.

The byte counts follow what the code allocates, not a rule of thumb:

- weights: every tensor the loader reads for a rank (`checkpoint/names.py`, the same list the
  loader and the model use): the dense weights on every rank (this engine runs data-parallel
  attention: each rank holds all of them), 1/EP of the routed experts (`ExpertPlacement`
  contiguous blocks: the largest block sizes the plan), and the vision tower, which a rank loads
  on its first image prompt (in fp32 today: engine/multimodal.py builds it in the default dtype);
- KV: the paged cache the engine allocates (`model/kv_cache.py` KVLayout, `engine/kv_budget.py`):
  the Serve values set `kv_cache_memory_gb` to what is left after everything else, so a rank gets
  that many GiB in pages of kv_block_size tokens for the layers of one group. A sequence of n
  tokens holds at most `KVLayout.pages_for_length(n)` pages: every token in the global (NoPE)
  group, only the current attention chunk's blocks (plus the one a chunk boundary shares) in each
  chunked (RoPE) group. The sequences that fit are the pages over the pages of one sequence of
  max_model_len. The slot design before paging (every slot reserved max_model_len positions in
  every layer) is printed for contrast;
- activations: an estimate of the largest step: a prefill chunk of max_prefill_tokens (prompts are
  split into chunks of that size, chunked prefill) beside one decode token for each sequence, the
  chunk's mask over up to max_model_len keys, and the keys and values a decode gathers from pages;
- overhead: what the card reports less than its label, the CUDA context, NCCL buffers and
  allocator slack (a flat allowance).

Sizes: B bytes, GiB = 2^30 bytes. GPU memory is given as the card is sold (H100 80, H200 141),
which for these cards means GiB. Shape legend of the formulas: C hidden, I expert / shared
width, Im dense-MLP width, H heads, KV kv heads, D head_dim, V vocab, E routed experts, L layers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint.names import TEXT_PREFIX, expected_text_tensors, expected_vision_tensors, is_routed_expert
from .config import ConfigError, EngineConfig, ModelConfig, TextConfig
from .engine.kv_budget import kv_pages, resolve_max_model_len
from .model.kv_cache import DEFAULT_BLOCK_SIZE, KVLayout
from .parallel.placement import ExpertPlacement

GIB = 2 ** 30
MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
ALIASES = {"maverick": "Llama-4-Maverick-17B-128E-Instruct",
           "maverick-fp8": "Llama-4-Maverick-17B-128E-Instruct-FP8",
           "scout": "Llama-4-Scout-17B-16E-Instruct"}
DTYPES = ("bf16", "fp8")
ACT_BYTES = 2          # bf16 activations and KV on GPU (the engine's dtype: auto -> bfloat16 on CUDA)
KV_DTYPE = torch.bfloat16
VISION_BYTES = 4       # engine/multimodal.py builds the vision tower in fp32 and moves it as is
MOE_IMBALANCE = 2.0    # a rank's routed rows in the activation estimate: this many times its fair share
# The compressed-tensors class names an ignore list may hold, as module-name patterns.
IGNORE_CLASSES = {"Llama4TextAttention": r".*self_attn$", "Llama4Router": r".*router$"}


# ---- the model's config ---------------------------------------------------------------------
def resolve_config(source: str | Path) -> Path:
    """A config.json path, a checkpoint directory, or a name in configs/models (file stem, or
    one of ALIASES) -> the config.json file."""
    p = Path(source)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    name = ALIASES.get(str(source).lower(), str(source))
    for f in sorted(MODELS_DIR.glob("*.json")):
        if f.stem.lower() == name.lower():
            return f
    known = sorted(ALIASES) + sorted(f.stem for f in MODELS_DIR.glob("*.json"))
    raise ConfigError(f"config.json: {source!r} is neither a config.json, a checkpoint directory nor a "
                      f"model in {MODELS_DIR} (known: {', '.join(known)})")


def load_config(source: str | Path) -> tuple[ModelConfig, dict, Path]:
    """(ModelConfig, the raw config.json dict, its path)."""
    path = resolve_config(source)
    cfg = ModelConfig.from_pretrained(path)
    return cfg, json.loads(path.read_text()), path


# ---- FP8 (compressed-tensors) scheme --------------------------------------------------------
@dataclass(frozen=True)
class Fp8Scheme:
    """Which Linear weights are stored in FP8 and how big their scales are.

    `ignore` entries are module names (`language_model.model.layers.0.self_attn.q_proj`),
    `re:` patterns (matched with re.match, as compressed-tensors does) or the class names in
    IGNORE_CLASSES. `strategy`: channel (one fp32 scale per output row), tensor (one), or block
    (one per block_structure tile)."""

    ignore: tuple[str, ...]
    strategy: str = "channel"
    block: tuple[int, int] | None = None
    assumed: bool = False   # True: the config has no quantization_config; the FP8 release's layout is assumed

    @classmethod
    def from_config(cls, raw: dict, cfg: ModelConfig) -> "Fp8Scheme":
        qc = raw.get("quantization_config")
        if not qc:
            return cls(ignore=tuple(default_fp8_ignore(cfg)), assumed=True)
        if qc.get("quant_method") != "compressed-tensors":
            raise ConfigError(f"quantization_config.quant_method: only compressed-tensors FP8 is planned, "
                              f"got {qc.get('quant_method')!r}")
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        weights = [g.get("weights") or {} for g in groups]
        fp8 = [w for w in weights if w.get("num_bits") == 8 and w.get("type") == "float"]
        if not fp8:
            raise ConfigError("quantization_config.config_groups: no 8-bit float weight scheme")
        w = fp8[0]
        block = tuple(w["block_structure"]) if w.get("block_structure") else None
        return cls(ignore=tuple(qc.get("ignore") or ()), strategy=w.get("strategy") or "channel", block=block)

    def _matchers(self):
        exact, patterns = set(), []
        for entry in self.ignore:
            if entry.startswith("re:"):
                patterns.append(re.compile(entry[3:]))
            elif entry in IGNORE_CLASSES:
                patterns.append(re.compile(IGNORE_CLASSES[entry]))
            else:
                exact.add(entry)
        return exact, patterns

    def quantized(self, modules: list[str]) -> dict[str, bool]:
        """Module name -> stored in FP8 (not ignored)."""
        exact, patterns = self._matchers()
        return {m: not (m in exact or any(p.match(m) for p in patterns)) for m in modules}

    def scale_bytes(self, out_features: int, in_features: int) -> int:
        if self.strategy == "tensor":
            return 4
        if self.strategy == "block" and self.block:
            return 4 * math.ceil(out_features / self.block[0]) * math.ceil(in_features / self.block[1])
        return 4 * out_features


def default_fp8_ignore(cfg: ModelConfig) -> list[str]:
    """The FP8 release's layout (configs/models/*-FP8.json): every Linear but the routed experts
    stays in bf16."""
    names = [m for m, _, _ in _linear_modules(cfg)]
    return [m for m in names if ".experts." not in m]


# ---- weights --------------------------------------------------------------------------------
def _linear_modules(cfg: ModelConfig):
    """(module name as in the checkpoint, out, in) of every Linear weight. Routed experts appear
    once per MoE layer as expert 0's gate/up/down (every expert of a layer is alike)."""
    out = []
    for name, shape in expected_text_tensors(cfg.text).items():
        if is_routed_expert(name):
            base = TEXT_PREFIX + name.rsplit(".", 1)[0] + ".0."
            E, a, b = shape
            if name.endswith("gate_up_proj"):   # (E, C, 2I): gate and up are (I, C) each
                out += [(base + "gate_proj", b // 2, a), (base + "up_proj", b // 2, a)]
            else:                               # (E, I, C): down is (C, I)
                out.append((base + "down_proj", b, a))
        elif name.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in name:
            out.append((TEXT_PREFIX + name[:-len(".weight")], shape[0], shape[1]))
    for name, shape in expected_vision_tensors(cfg).items():
        if name.endswith(".weight") and len(shape) == 2:
            out.append((name[:-len(".weight")], shape[0], shape[1]))
    return out


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the model's weights by kind, in the planned dtype."""

    dense: int            # everything in the text model but the routed experts (on every rank)
    per_expert: int       # one routed expert over all MoE layers, FP8 scales included
    vision: int           # vision tower + multi-modal projector, as stored
    num_experts: int
    vision_numel: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.per_expert * self.num_experts + self.vision


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", scheme: Fp8Scheme | None = None) -> WeightBytes:
    """Weight bytes of the tensors the loader reads (names.py), bf16, or FP8 where `scheme` says."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {DTYPES}, got {dtype!r}")
    fp8: dict[str, bool] = {}
    shapes: dict[str, tuple[int, int]] = {}
    if dtype == "fp8":
        scheme = scheme or Fp8Scheme(ignore=tuple(default_fp8_ignore(cfg)), assumed=True)
        shapes = {m: (o, i) for m, o, i in _linear_modules(cfg)}
        fp8 = scheme.quantized(list(shapes))

    def linear_bytes(module: str, numel: int) -> int:
        if not fp8.get(module):
            return ACT_BYTES * numel
        o, i = shapes[module]
        return numel + scheme.scale_bytes(o, i)

    dense = per_expert = 0
    E = cfg.text.num_local_experts
    for name, shape in expected_text_tensors(cfg.text).items():
        numel = math.prod(shape)
        if is_routed_expert(name):
            base = TEXT_PREFIX + name.rsplit(".", 1)[0] + ".0."
            per = numel // E
            if name.endswith("gate_up_proj"):
                per_expert += linear_bytes(base + "gate_proj", per // 2) + linear_bytes(base + "up_proj", per // 2)
            else:
                per_expert += linear_bytes(base + "down_proj", per)
        elif name.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in name:
            dense += linear_bytes(TEXT_PREFIX + name[:-len(".weight")], numel)
        else:
            dense += ACT_BYTES * numel
    vision = vision_numel = 0
    for name, shape in expected_vision_tensors(cfg).items():
        numel = math.prod(shape)
        module = name[:-len(".weight")]
        vision += linear_bytes(module, numel) if name.endswith(".weight") and len(shape) == 2 else ACT_BYTES * numel
        vision_numel += numel
    return WeightBytes(dense=dense, per_expert=per_expert, vision=vision, num_experts=E, vision_numel=vision_numel)


# ---- KV cache and activations ---------------------------------------------------------------
@dataclass(frozen=True)
class KVBytes:
    """One rank's paged KV cache as the engine lays it out (model/kv_cache.py KVLayout, bf16), and
    the slot design before paging, for contrast."""

    layout: KVLayout
    page_bytes: int        # one page: K and V of one block for the layers of one group (KVLayout.page_bytes)
    per_token_layer: int   # K and V of one token in one layer: 2 x KV x D x 2 B
    layers: int
    local_layers: int      # layers of the chunked (local) groups
    chunk: int | None

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def pages_per_seq(self, length: int) -> int:
        """Pages one sequence of `length` tokens holds at most (KVLayout.pages_for_length)."""
        return self.layout.pages_for_length(length)

    def paged_per_seq(self, length: int) -> int:
        """Bytes one sequence of `length` tokens holds at most in the paged cache."""
        return self.pages_per_seq(length) * self.page_bytes

    @property
    def per_token(self) -> int:
        """One token in every layer."""
        return self.per_token_layer * self.layers

    def slot_per_seq(self, max_model_len: int) -> int:
        """The slot design before paging: every slot reserved max_model_len positions in every layer."""
        return self.per_token * max_model_len


def kv_bytes(cfg: ModelConfig, block_size: int = DEFAULT_BLOCK_SIZE) -> KVBytes:
    t = cfg.text
    layout = KVLayout.from_config(t, block_size)
    local = sum(len(g) for g, is_local in zip(layout.groups, layout.local) if is_local)
    return KVBytes(layout=layout, page_bytes=layout.page_bytes(KV_DTYPE),
                   per_token_layer=2 * t.num_key_value_heads * t.head_dim * ACT_BYTES, layers=t.num_hidden_layers,
                   local_layers=local, chunk=layout.chunk)


def activation_bytes(cfg: ModelConfig, prefill_tokens: int, max_num_seqs: int, context: int) -> int:
    """Estimate of the largest step's transient memory on one rank: a prefill chunk of
    `prefill_tokens` beside one decode token for each of `max_num_seqs` sequences, contexts up to
    `context` tokens.

    Per new token (bf16): the residual stream and its norm (3C), plus the widest sublayer: a dense
    MLP (gate/up out 2Im, SwiGLU Im, out C), the routed path (MOE_IMBALANCE x its share: rows,
    packed rows, received rows, 2I, I, out, combined ~ 5C + 3I) with the shared expert (3I), or
    attention (qkv (H + 2KV) D, RoPE and output 2 H D); plus fp32 temporaries of RMSNorm and RoPE
    (C + (H + KV) D). Plus the chunk's boolean mask over its keys (min(chunk, context) x
    context), the keys and values the decode gathers from the pages for one layer (max_num_seqs
    x context x 2 KV D, bf16), and fp32 logits of a full decode batch for sampling (max_num_seqs
    x V x 4 B, twice)."""
    t = cfg.text
    C, I, D = t.hidden_size, t.intermediate_size, t.head_dim
    H, KV = t.num_attention_heads, t.num_key_value_heads
    Im = t.intermediate_size_mlp if not all(t.is_moe) else 0
    k = t.num_experts_per_tok
    widest = max(3 * Im + C, int(MOE_IMBALANCE * k * (5 * C + 3 * I)) + 3 * I, (H + 2 * KV) * D + 2 * H * D)
    per_token = ACT_BYTES * (3 * C + widest) + 4 * (C + (H + KV) * D)
    tokens = prefill_tokens + max_num_seqs
    mask = min(prefill_tokens, context) * context
    gathered = max_num_seqs * context * 2 * KV * D * ACT_BYTES
    return per_token * tokens + mask + gathered + 8 * max_num_seqs * t.vocab_size


def kv_cache_memory_gb(budget: int) -> float:
    """The Serve value for a KV budget in bytes: GiB rounded down to 0.01 (0 when nothing is left)."""
    return math.floor(budget / GIB * 100) / 100 if budget > 0 else 0.0


def rank_kv_pages(memory_gb: float, text: TextConfig, layout: KVLayout, max_model_len: int) -> int:
    """The pages a rank's KV cache gets with kv_cache_memory_gb = memory_gb on GPU: the engine's
    own rule (engine/kv_budget.py kv_pages). 0 when memory_gb is 0."""
    if memory_gb <= 0:
        return 0
    engine = EngineConfig(kv_cache_memory_gb=memory_gb, kv_block_size=layout.block_size, max_model_len=max_model_len)
    return kv_pages(engine, text, layout, KV_DTYPE, torch.device("cuda"))


def longest_context(text: TextConfig, layout: KVLayout, pages: int) -> int:
    """The longest sequence `pages` hold (capped at the checkpoint's context), by the engine's rule
    for max_model_len 0 (engine/kv_budget.py resolve_max_model_len); 0 when not one block fits."""
    if pages < layout.num_groups:
        return 0
    return resolve_max_model_len(EngineConfig(max_model_len=0), text, layout, pages, KV_DTYPE)


# ---- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """GPUs of one engine (one Serve replica): `gpus` per node x `nodes`, one EP rank per GPU."""

    gpus: int = 8
    nodes: int = 1
    gpu_memory_gib: float = 80.0
    ep: int | None = None          # default: one rank per GPU

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class Workload:
    max_model_len: int = 8192
    max_num_seqs: int | None = None   # None: as many as fit
    max_prefill_tokens: int = 4096
    vision: bool = True               # False: no image prompts (the vision tower is never loaded)
    overhead_gib: float = 3.0
    cpus_per_worker: float = 4
    replica_cpus: float = 2
    kv_block_size: int = DEFAULT_BLOCK_SIZE   # tokens per KV page (the engine's kv_block_size)


@dataclass
class Plan:
    """Everything `maverick-ray plan` prints, in bytes (see to_dict for the JSON form)."""

    model: str
    dtype: str
    ep: int
    cluster: Cluster
    workload: Workload
    weights: WeightBytes
    kv: KVBytes
    experts_per_rank: int           # the largest rank's share
    rank_dense: int
    rank_experts: int
    rank_vision: int
    activations: int
    overhead: int
    gpu_bytes: int
    kv_budget: int                  # what is left for the KV cache on the fullest rank (may be < 0)
    kv_cache_memory_gb: float       # the Serve value: kv_budget in GiB, rounded down to 0.01
    kv_pages: int                   # the pages a rank's cache gets with it (engine/kv_budget.py)
    kv_pages_per_seq: int           # pages of one sequence of max_model_len (KVLayout.pages_for_length)
    seqs_paged: int                 # sequences of max_model_len that kv_pages hold at once
    seqs_slots: int                 # the same in the slot design before paging (max_model_len reserved per slot)
    kv_at_fraction: int             # KV bytes with kv_cache_memory_gb 0: kv_cache_fraction of what the weights leave
    max_num_seqs: int               # what the Serve values use
    fits: bool
    verdict: str
    notes: list[str] = field(default_factory=list)

    @property
    def rank_weights(self) -> int:
        return self.rank_dense + self.rank_experts + self.rank_vision

    @property
    def reference_even_split(self) -> int:
        """All weights spread evenly over the GPUs (what tensor-parallel servers such as vLLM
        -tp N hold per GPU; published sizes are quoted this way). Not this engine's layout."""
        return math.ceil(self.weights.total / self.cluster.total_gpus)

    @property
    def reference_even_split_left(self) -> int:
        """GPU memory left beside reference_even_split, after the same overhead allowance."""
        return self.gpu_bytes - self.overhead - self.reference_even_split

    def to_dict(self) -> dict:
        """The figures as a JSON-ready dict (bytes; plan_output.plan_json adds the Serve and KubeRay values)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("cluster", "workload", "weights", "kv")}
        d.update(cluster=asdict(self.cluster), workload=asdict(self.workload), weights=asdict(self.weights),
                 weights_total=self.weights.total, rank_weights=self.rank_weights,
                 kv_per_token=self.kv.per_token, kv_per_token_layer=self.kv.per_token_layer,
                 kv_local_layers=self.kv.local_layers, kv_chunk=self.kv.chunk, kv_block_size=self.kv.block_size,
                 kv_groups=[list(g) for g in self.kv.layout.groups], kv_page_bytes=self.kv.page_bytes,
                 kv_cache_bytes=self.kv_pages * self.kv.page_bytes,
                 kv_paged_per_seq=self.kv.paged_per_seq(self.workload.max_model_len),
                 kv_slot_per_seq=self.kv.slot_per_seq(self.workload.max_model_len),
                 reference_even_split=self.reference_even_split,
                 reference_even_split_left=self.reference_even_split_left)
        return d


def make_plan(source: str | Path, cluster: Cluster, workload: Workload = Workload(), dtype: str | None = None) -> Plan:
    """Sizes one engine of the model in `source` (see resolve_config) on `cluster`.

    dtype: bf16 or fp8; default fp8 when config.json has a quantization_config, else bf16.
    Raises ConfigError for a shape that cannot run (more ranks than GPUs or experts)."""
    cfg, raw, path = load_config(source)
    notes: list[str] = []
    has_q = bool(raw.get("quantization_config"))
    dtype = dtype or ("fp8" if has_q else "bf16")
    scheme = None
    if dtype == "fp8":
        scheme = Fp8Scheme.from_config(raw, cfg)
        if scheme.assumed:
            notes.append("config.json has no quantization_config: FP8 assumes the official release's layout "
                         "(routed experts FP8 with per-channel fp32 scales, everything else bf16)")
        notes.append("FP8 checkpoints load (checkpoint/fp8.py), but the engine dequantizes their routed experts "
                     "to bf16 at load (the FP8 expert matmuls of model/fp8_experts.py are not wired in yet): these "
                     "are the FP8 layout's bytes, as a rank reads them; a rank holds the bf16 plan's (--dtype bf16)")
    elif has_q:
        notes.append("bf16 plan of an FP8 checkpoint: the weights dequantized to bf16 at load")
    wb = weight_bytes(cfg, dtype, scheme)
    ep = cluster.ep or cluster.total_gpus
    E = cfg.text.num_local_experts
    if ep > cluster.total_gpus:
        raise ConfigError(f"ep: {ep} ranks need {ep} GPUs, the cluster has {cluster.total_gpus}")
    if ep > E:
        raise ConfigError(f"ep: {ep} ranks for {E} routed experts; every rank must own at least one")
    if ep < cluster.total_gpus:
        notes.append(f"EP {ep} uses {ep} of the {cluster.total_gpus} GPUs; the others stay idle in this engine")
    share = max(len(ExpertPlacement.contiguous(E, ep).experts_of(r)) for r in range(ep))
    if E % ep:
        notes.append(f"{E} experts do not split evenly over {ep} ranks: the fullest rank holds {share}")
    wl = workload
    rank_vision = VISION_BYTES * wb.vision_numel if (wl.vision and cfg.vision is not None) else 0
    if rank_vision:
        notes.append("the vision tower is counted in fp32, as engine/multimodal.py loads it on a rank's first "
                     "image prompt (2x its bf16 size; --text-only leaves it out)")
    kv = kv_bytes(cfg, wl.kv_block_size)
    L = wl.max_model_len
    per_seq = kv.pages_per_seq(L)
    gpu = int(cluster.gpu_memory_gib * GIB)
    overhead = int(wl.overhead_gib * GIB)
    rank_weights = wb.dense + share * wb.per_expert + rank_vision
    seqs = wl.max_num_seqs or 1
    for _ in range(2):  # the decode batch's activations depend on how many sequences fit: settle it once
        act = activation_bytes(cfg, wl.max_prefill_tokens, seqs, L)
        budget = gpu - overhead - act - rank_weights
        memory_gb = kv_cache_memory_gb(budget)
        pages = rank_kv_pages(memory_gb, cfg.text, kv.layout, L)
        seqs_paged = pages // per_seq
        seqs = wl.max_num_seqs or max(1, seqs_paged)
    # Left at 0, the engine takes kv_cache_fraction of the device memory free once the weights are
    # in (the vision tower comes later, on the first image prompt).
    at_fraction = int(max(0, gpu - overhead - wb.dense - share * wb.per_expert) * EngineConfig().kv_cache_fraction)
    plan = Plan(model=path.stem if path.name != "config.json" else path.parent.name, dtype=dtype, ep=ep,
                cluster=cluster, workload=wl, weights=wb, kv=kv, experts_per_rank=share, rank_dense=wb.dense,
                rank_experts=share * wb.per_expert, rank_vision=rank_vision, activations=act, overhead=overhead,
                gpu_bytes=gpu, kv_budget=budget, kv_cache_memory_gb=memory_gb, kv_pages=pages,
                kv_pages_per_seq=per_seq, seqs_paged=seqs_paged, seqs_slots=max(0, budget // kv.slot_per_seq(L)),
                kv_at_fraction=at_fraction, max_num_seqs=0, fits=False, verdict="", notes=notes)
    plan.fits, plan.verdict, plan.max_num_seqs = _verdict(plan, cfg.text)
    if plan.fits and at_fraction > budget:
        notes.append(f"kv_cache_memory_gb left at 0 would size the KV cache as kv_cache_fraction "
                     f"({EngineConfig().kv_cache_fraction:g}) of the memory the weights leave, {_gib(at_fraction)}: "
                     f"{_gib(at_fraction - budget)} more than the budget above, taken from the activations"
                     + (" and the vision tower (loaded after the cache)" if rank_vision else "")
                     + "; set kv_cache_memory_gb as below")
    return plan


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _verdict(p: Plan, text: TextConfig) -> tuple[bool, str, int]:
    """(fits, why, the max_num_seqs to configure)."""
    wl = p.workload
    fixed = p.rank_weights + p.overhead + p.activations
    if fixed > p.gpu_bytes:
        return False, (f"does not fit: each rank needs {_gib(p.rank_weights)} of weights + {_gib(p.activations)} "
                       f"of activations + {_gib(p.overhead)} overhead = {_gib(fixed)}, more than the "
                       f"{_gib(p.gpu_bytes)} of one GPU, before any KV cache"), 0
    per_seq = p.kv.paged_per_seq(wl.max_model_len)
    if p.seqs_paged == 0:
        longest = longest_context(text, p.kv.layout, p.kv_pages)
        hint = f" (the {p.kv_pages} pages left hold one sequence of {longest} tokens)" if longest else ""
        return False, (f"does not fit: the weights fit, but one sequence of {wl.max_model_len} tokens needs "
                       f"{_gib(per_seq)} of KV ({p.kv_pages_per_seq} pages) and {_gib(p.kv_budget)} is left per "
                       f"rank; lower --max-model-len{hint}"), 0
    if wl.max_num_seqs is not None and wl.max_num_seqs > p.seqs_paged:
        return False, (f"does not fit as configured: {wl.max_num_seqs} sequences of {wl.max_model_len} tokens per "
                       f"rank need {_gib(wl.max_num_seqs * per_seq)} of KV, {_gib(p.kv_budget)} is left; at most "
                       f"{p.seqs_paged} fit (--max-num-seqs {p.seqs_paged})"), p.seqs_paged
    seqs = wl.max_num_seqs or p.seqs_paged
    return True, (f"fits: {_gib(p.rank_weights)} of weights per rank, {_gib(p.kv_budget)} left for KV: "
                  f"{seqs} sequences of {wl.max_model_len} tokens per rank ({seqs * p.ep} per engine)"), seqs
