"""`maverick-ray plan`: byte counts against hand arithmetic from Llama 4's published dimensions
(../shared/LLAMA4.md) and the paged KV cache's rule, and the published fit / no-fit facts."""

from __future__ import annotations

import json
import math

import pytest

from maverick_ray.cli import main
from maverick_ray.config import ConfigError, ModelConfig
from maverick_ray.plan import GIB, Cluster, Workload, kv_bytes, load_config, make_plan, weight_bytes

# Published dimensions (text): hidden, heads, kv heads, head dim, layers, vocab, expert width, dense MLP width.
C, H, KV, D, L, V, I, IM = 5120, 40, 8, 128, 48, 202048, 8192, 16384


def attention_params() -> int:
    return C * H * D + 2 * C * KV * D + H * D * C        # q, k, v, o


def vision_params() -> int:
    h, inter, patch_in, tokens = 1408, 5632, 3 * 14 * 14, (336 // 14) ** 2 + 1
    block = 4 * (h * h + h) + (inter * h + inter) + (h * inter + h) + 4 * h   # attn (bias), fc1, fc2, 2 LayerNorms
    return (h * patch_in + h + tokens * h + 4 * h + 34 * block
            + 4096 * inter + 4096 * 4096 + C * 4096)                          # adapter fc1, fc2; projector


def maverick_dense_params() -> int:
    moe, dense = 24, 24                                   # MoE at odd layers (interleave step 2)
    return (2 * V * C + C + L * (attention_params() + 2 * C)
            + dense * 3 * C * IM + moe * (128 * C + 3 * C * I))   # router + shared expert


def scout_dense_params() -> int:
    return 2 * V * C + C + L * (attention_params() + 2 * C) + L * (16 * C + 3 * C * I)


def test_maverick_bf16_bytes_by_hand():
    cfg, _, _ = load_config("maverick")
    wb = weight_bytes(cfg, "bf16")
    assert wb.dense == 2 * maverick_dense_params()
    assert wb.per_expert == 2 * 24 * 3 * C * I
    assert wb.vision == 2 * vision_params()
    params = wb.total // 2
    assert 398e9 < params < 404e9, "Maverick is about 401B parameters"
    assert 795e9 < wb.total < 810e9, "about 802 GB in bf16"


def test_maverick_fp8_bytes_by_hand():
    cfg, raw, _ = load_config("maverick-fp8")
    from maverick_ray.plan import Fp8Scheme

    scheme = Fp8Scheme.from_config(raw, cfg)
    assert not scheme.assumed and scheme.strategy == "channel"
    wb = weight_bytes(cfg, "fp8", scheme)
    # Routed experts: 1 byte per weight plus one fp32 scale per output channel (gate I, up I, down C).
    assert wb.per_expert == 24 * (3 * C * I + 4 * (2 * I + C))
    assert wb.dense == 2 * maverick_dense_params()       # the ignore list keeps everything else in bf16
    assert wb.vision == 2 * vision_params()
    assert 380 * GIB < wb.total < 395 * GIB, "the FP8 release is about 389 GB"
    # With no quantization_config, fp8 assumes the same layout.
    assert weight_bytes(ModelConfig.from_pretrained(load_config("maverick")[2]), "fp8") == wb


def test_scout_bytes_by_hand():
    cfg, _, _ = load_config("scout")
    wb = weight_bytes(cfg, "bf16")
    assert wb.dense == 2 * scout_dense_params()
    assert wb.per_expert == 2 * 48 * 3 * C * I
    assert 105e9 < wb.total // 2 < 112e9, "Scout is about 109B parameters"


# The paged KV cache, by hand (model/kv_cache.py). Maverick and Scout: 12 NoPE layers (every 4th)
# attend globally, 36 RoPE layers within chunks of 8192 tokens. The 12 global layers form one
# group, the 36 chunked ones three groups of 12; a page is one block of BS tokens for the 12 layers
# of a group. A sequence of n tokens holds every block in the global group, ceil(n / BS), and in
# each chunked group at most the current chunk's blocks plus the one a chunk boundary shares,
# min(ceil(n / BS), ceil(8192 / BS) + 1).
CHUNK, GLOBAL_LAYERS, LOCAL_LAYERS, GROUP = 8192, 12, 36, 12
TOKEN_LAYER = 2 * KV * D * 2          # K and V of one token in one layer, bf16


def page_bytes_by_hand(bs: int = 16) -> int:
    return TOKEN_LAYER * bs * GROUP


def pages_by_hand(n: int, bs: int = 16) -> int:
    blocks = math.ceil(n / bs)
    return blocks + 3 * min(blocks, math.ceil(CHUNK / bs) + 1)


def paged_bytes_by_hand(n: int, bs: int = 16) -> int:
    """Bytes one sequence of n tokens holds, layer by layer: the global layers every token (whole
    blocks), the chunked ones at most chunk + one block."""
    blocks = math.ceil(n / bs)
    return TOKEN_LAYER * bs * (GLOBAL_LAYERS * blocks + LOCAL_LAYERS * min(blocks, CHUNK // bs + 1))


def rank_pages_by_hand(budget: int, bs: int = 16) -> int:
    """Pages a rank gets when kv_cache_memory_gb is the budget rounded down to 0.01 GiB."""
    gb = math.floor(budget / GIB * 100) / 100
    return int(gb * GIB) // page_bytes_by_hand(bs)


@pytest.mark.parametrize("model", ["maverick", "scout"])
def test_kv_bytes_paged_and_slot_by_hand(model):
    kv = kv_bytes(load_config(model)[0])
    assert kv.per_token == L * KV * D * 2 * 2 == 196_608
    assert kv.local_layers == LOCAL_LAYERS and kv.chunk == CHUNK and kv.block_size == 16
    assert kv.page_bytes == page_bytes_by_hand() == 786_432
    assert kv.slot_per_seq(32768) == 196_608 * 32768
    assert kv.pages_per_seq(32768) == 2048 + 3 * 513
    assert kv.paged_per_seq(32768) == paged_bytes_by_hand(32768) == 2_820_931_584
    for n in (1, 15, 16, 17, 4096, 8192, 8193, 8208, 8209, 131072, 1 << 20):
        assert kv.paged_per_seq(n) == paged_bytes_by_hand(n) == pages_by_hand(n) * page_bytes_by_hand(), n
    assert kv.paged_per_seq(1) == L * 16 * TOKEN_LAYER          # one whole block in every layer
    assert kv.paged_per_seq(4096) == kv.slot_per_seq(4096)      # within one chunk: no saving
    assert kv.paged_per_seq(131072) < 0.3 * kv.slot_per_seq(131072)
    assert kv.paged_per_seq(1 << 20) < 0.26 * kv.slot_per_seq(1 << 20)   # long contexts: about a quarter
    kv32 = kv_bytes(load_config(model)[0], block_size=32)
    assert kv32.page_bytes == page_bytes_by_hand(32) == 2 * 786_432
    assert kv32.paged_per_seq(32768) == paged_bytes_by_hand(32768, 32)
    assert kv32.pages_per_seq(32768) == 1024 + 3 * 257


def rank_bytes(dense: int, per_expert: int, experts: int, vision: int) -> int:
    return dense + per_expert * experts + vision


def test_published_fact_bf16_maverick_does_not_fit_8_x_80gb():
    p = make_plan("maverick", Cluster(gpus=8, gpu_memory_gib=80))
    assert p.ep == 8 and p.experts_per_rank == 16
    assert p.rank_weights == rank_bytes(2 * maverick_dense_params(), 2 * 24 * 3 * C * I, 16, 4 * vision_params())
    assert p.rank_weights > 80 * GIB and not p.fits and "before any KV cache" in p.verdict
    assert p.reference_even_split > 80 * GIB       # no layout holds 802 GB on 640


def test_published_fact_fp8_maverick_fits_8_x_h100_with_25_to_30_gb_left():
    p = make_plan("maverick-fp8", Cluster(gpus=8, gpu_memory_gib=80), Workload(max_model_len=4096))
    assert p.dtype == "fp8" and p.fits, p.verdict
    # The published figure spreads every weight over the 8 GPUs (vLLM -tp 8): ~49 GB each, 25-30 GB left.
    assert 47 * GIB < p.reference_even_split < 50 * GIB
    assert 25 * GIB <= p.reference_even_split_left <= 30 * GIB
    # This engine replicates the dense weights on every rank, which leaves far less for KV.
    assert p.rank_weights == rank_bytes(2 * maverick_dense_params(), 24 * (3 * C * I + 4 * (2 * I + C)), 16,
                                        4 * vision_params())   # the engine runs the vision tower in fp32
    assert 0 < p.kv_budget < 5 * GIB
    assert p.kv_pages == rank_pages_by_hand(p.kv_budget)
    assert p.seqs_paged == p.kv_pages // pages_by_hand(4096) >= 1
    assert not any("do not load yet" in n for n in p.notes)
    assert any("dequantizes" in n for n in p.notes)   # the engine holds them in bf16 today


@pytest.mark.parametrize("cluster, length", [(Cluster(gpus=8, nodes=2, gpu_memory_gib=80), 4096),
                                             (Cluster(gpus=8, gpu_memory_gib=141), 8192)],
                         ids=["2x8xH100", "8xH200"])
def test_published_fact_bf16_maverick_fits_16_x_h100_and_8_x_h200(cluster, length):
    p = make_plan("maverick", cluster, Workload(max_model_len=length))
    assert p.fits, p.verdict
    share = 128 // cluster.total_gpus
    assert p.rank_experts == share * 2 * 24 * 3 * C * I
    expected_budget = (int(cluster.gpu_memory_gib * GIB) - p.overhead - p.activations
                       - rank_bytes(2 * maverick_dense_params(), 2 * 24 * 3 * C * I, share, 4 * vision_params()))
    assert p.kv_budget == expected_budget
    pages = rank_pages_by_hand(expected_budget)
    assert p.kv_pages == pages and pages * page_bytes_by_hand() <= expected_budget
    assert expected_budget - pages * page_bytes_by_hand() < 0.01 * GIB + page_bytes_by_hand()
    # Within one chunk a sequence holds every block in every layer: 4 groups x length / 16 pages.
    assert p.kv_pages_per_seq == 4 * length // 16
    assert p.seqs_paged == pages // (4 * length // 16) >= 1 and p.max_num_seqs == p.seqs_paged
    assert p.seqs_slots == expected_budget // (196_608 * length)


def test_long_context_fits_only_paged():
    """8 x H200 at 128k: the chunked layers keep 8208 tokens of 131072, so two sequences fit per rank
    where the slot design (24 GiB each) held none."""
    p = make_plan("maverick", Cluster(gpus=8, gpu_memory_gib=141), Workload(max_model_len=131072))
    assert p.kv_pages_per_seq == 8192 + 3 * 513
    assert p.kv.paged_per_seq(131072) == TOKEN_LAYER * (12 * 131072 + 36 * 8208)
    assert p.kv.slot_per_seq(131072) == 24 * GIB > p.kv_budget
    assert p.kv_pages == rank_pages_by_hand(p.kv_budget)
    assert p.seqs_slots == 0 and p.seqs_paged == p.kv_pages // (8192 + 3 * 513) == 2
    assert p.fits, p.verdict


def test_a_context_that_does_not_fit_names_the_longest_that_does():
    p = make_plan("maverick", Cluster(gpus=8, gpu_memory_gib=141), Workload(max_model_len=1 << 20))
    assert not p.fits and p.seqs_paged == 0 and p.kv_pages > 0
    # alone, one sequence's prefill step (4096 prompt tokens, max_prefill_tokens) holds the blocks
    # from the chunk it starts in: ceil((8192 - 1 + 4096) / 16) + 1 = 769 per chunked group, so
    # ceil(n / 16) + 3 x 769 pages <= kv_pages: n = 16 x (kv_pages - 2307)
    longest = 16 * (p.kv_pages - 3 * 769)
    assert f"one sequence of {longest} tokens" in p.verdict


def test_too_many_sequences_is_refused_with_the_number_that_fits():
    wl = Workload(max_model_len=8192, max_num_seqs=64)
    p = make_plan("maverick", Cluster(gpus=8, gpu_memory_gib=141), wl)
    assert not p.fits and f"at most {p.seqs_paged} fit" in p.verdict and p.max_num_seqs == p.seqs_paged
    assert p.seqs_paged == rank_pages_by_hand(p.kv_budget) // 2048 < 64


def test_shapes_that_cannot_run_and_uneven_experts():
    with pytest.raises(ConfigError, match="ranks need 16 GPUs"):
        make_plan("maverick", Cluster(gpus=8, ep=16))
    with pytest.raises(ConfigError, match="at least one"):
        make_plan("scout", Cluster(gpus=8, nodes=4))
    p = make_plan("scout", Cluster(gpus=3, gpu_memory_gib=141))
    assert p.experts_per_rank == 6 and any("do not split evenly" in n for n in p.notes)
    with pytest.raises(ConfigError, match="known: maverick"):
        make_plan("no-such-model", Cluster())


def test_text_only_drops_the_vision_tower():
    with_v = make_plan("maverick", Cluster(gpus=8, nodes=2), Workload(max_model_len=4096))
    without = make_plan("maverick", Cluster(gpus=8, nodes=2), Workload(max_model_len=4096, vision=False))
    assert with_v.rank_vision == 4 * vision_params() and without.rank_vision == 0   # fp32 on the rank
    # The budget grows by the tower (less the larger decode batch's logits in the activation estimate).
    assert (without.kv_budget + without.activations) - (with_v.kv_budget + with_v.activations) == with_v.rank_vision
    assert without.seqs_paged > with_v.seqs_paged


def test_cli_json_gives_serve_args_serve_accepts(tmp_path, capsys):
    from maverick_ray.serve.settings import ServeSettings

    rc = main(["plan", "maverick", "--nodes", "2", "--gpus", "8", "--max-model-len", "4096", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["ep"] == 16
    assert out["rank_dense"] == 2 * maverick_dense_params()
    serve = out["serve"]
    settings = ServeSettings.from_args(serve["args"])     # every arg is one the app accepts
    assert settings.placement_group_bundles() == serve["deployment"]["placement_group_bundles"]
    assert len(serve["deployment"]["placement_group_bundles"]) == 17
    assert serve["args"]["placement_strategy"] == "SPREAD"
    assert out["kuberay"]["worker_pods_per_engine"] == 2 and out["kuberay"]["gpus_per_pod"] == 8
    # The KV budget goes to the engine as kv_cache_memory_gb: the pages the plan counts.
    engine = settings.engine_config
    assert engine.kv_cache_memory_gb == out["kv_cache_memory_gb"] > 0 and engine.kv_block_size == 16
    assert out["kv_pages"] == rank_pages_by_hand(out["kv_budget"]) == int(engine.kv_cache_memory_gb * GIB) // 786_432
    assert out["kv_cache_bytes"] == out["kv_pages"] * 786_432 <= out["kv_budget"]
    assert out["kv_pages_per_seq"] == 1024 and out["seqs_paged"] == out["kv_pages"] // 1024
    # --kv-block-size: pages of 32 tokens, twice the bytes, half as many per sequence.
    assert main(["plan", "maverick", "--nodes", "2", "--gpus", "8", "--max-model-len", "4096", "--json",
                 "--kv-block-size", "32"]) == 0
    out32 = json.loads(capsys.readouterr().out)
    assert out32["kv_page_bytes"] == 2 * 786_432 and out32["kv_pages_per_seq"] == 512
    assert out32["serve"]["args"]["kv_block_size"] == 32
    assert out32["kv_pages"] == rank_pages_by_hand(out32["kv_budget"], 32)
    # A config.json path works as well as a name; a plan that does not fit exits 1.
    cfg_path = load_config("maverick")[2]
    assert main(["plan", str(cfg_path), "--gpus", "8"]) == 1
    text = capsys.readouterr().out
    assert "does not fit" in text and "dense weights (replicated on every rank)" in text
    assert main(["plan", "maverick", "--gpus", "8", "--gpu-memory", "141"]) == 0
    text = capsys.readouterr().out
    assert "paged (what the engine allocates)" in text and "slot design before paging" in text
    assert "not built yet" not in text and "kv_cache_memory_gb: " in text


@pytest.mark.parametrize("path", ["configs/maverick-gpu.yaml", "k8s/rayservice-maverick-gpu.yaml"])
def test_the_shipped_maverick_gpu_configs_fit_the_h200_nodes_they_are_sized_for(path):
    """The Serve config and the KubeRay manifest as shipped: plan says they fit 2 x 8 H200, and
    their KV budget is within what plan leaves (and they would not fit H100s)."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / path).read_text())
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc
    args = serve["applications"][0]["args"]
    deployment = serve["applications"][0]["deployments"][0]
    work = Workload(max_model_len=args["max_model_len"], max_num_seqs=args["max_num_seqs"],
                    max_prefill_tokens=args.get("max_prefill_tokens", 4096))
    nodes = args["ep_size"] * args["num_gpus_per_worker"] // 8
    p = make_plan("maverick", Cluster(gpus=8, nodes=nodes, gpu_memory_gib=141), work, dtype="bf16")
    assert p.fits, p.verdict
    assert args["kv_cache_memory_gb"] <= p.kv_cache_memory_gb
    assert len(deployment["placement_group_bundles"]) == 1 + args["ep_size"]
    assert not make_plan("maverick", Cluster(gpus=8, nodes=nodes, gpu_memory_gib=80), work, dtype="bf16").fits
