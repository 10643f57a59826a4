"""benchmarks/bench_moe_layer.py's CPU smoke path: the GPU check script's Python part runs end to end
(tiny sizes), so benchmarks/gpu_check.sh is not first run on a lent GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe_layer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layer_smoke_writes_results_with_every_variant(bench, tmp_path):
    assert bench.main(["layer", "--cpu-smoke", "--out", str(tmp_path), "--tokens", "4", "32", "--repeats", "2"]) == 0
    res = json.loads((tmp_path / "moe_layer.json").read_text())
    assert (tmp_path / "moe_layer.md").read_text().startswith("MoE layer")
    assert res["copy_bandwidth_gb_s"] > 0
    rows = {(r["tokens"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {(t, v) for t in (4, 32) for v in ("bf16 loop", "bf16 grouped", "fp8 loop", "fp8 grouped")}
    loop = rows[(32, "bf16 loop")]
    assert loop["rel_err_vs_bf16_loop"] == 0 and 0 < loop["pct_roofline"] and loop["touched_experts"] <= 8
    # Roofline: touched experts x 3 x hidden x width x 2 bytes over the measured bandwidth (or FLOPs, if more).
    floor = loop["touched_experts"] * 3 * 64 * 64 * 2 / (res["copy_bandwidth_gb_s"] * 1e9)
    assert loop["roofline_seconds"] >= floor * 0.999
    for (t, v), r in rows.items():   # every variant either ran and agrees, or says why not
        assert ("error" in r) != ("seconds" in r)
        if "seconds" in r:
            assert r["rel_err_vs_bf16_loop"] < (0.15 if v.startswith("fp8") else 0.02), (t, v)


def test_engine_smoke_decodes_on_the_tiny_checkpoint(bench, tmp_path, tiny_ckpt):
    assert bench.main(["engine", "--cpu-smoke", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "engine_decode.json").read_text())
    assert res["device"] == "cpu" and res["all_outputs_full_length"] and res["output_tokens_per_s"] > 0
