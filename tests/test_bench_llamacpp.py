"""benchmarks/bench_llamacpp.py's pure parts: reading llama-batched-bench's output, counting our decode steps,
and the clean skip without a toolchain. Nothing here builds or runs llama.cpp."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# What llama-batched-bench --output-format jsonl prints: log lines around one JSON object per run.
OUTPUT = """\
0.00.017.613 W load: special_eos_id is not in special_eog_ids - the tokenizer config may be incorrect
0.00.084.444 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 8192
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 64, "pl": 1, "n_kv": 96, "t_pp": 0.026075, \
"speed_pp": 1227.229126, "t_tg": 0.128, "speed_tg": 500.0, "t": 0.154075, "speed": 623.07}
{"n_kv_max": 8192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 32, "tg": 64, "pl": 32, "n_kv": 3072, "t_pp": 1.327668, \
"speed_pp": 771.277161, "t_tg": 0.8192, "speed_tg": 2500.0, "t": 2.146868, "speed": 1431.0}
"""


def load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lcpp():
    return load("llamacpp")


def test_parses_jsonl_among_log_lines(lcpp):
    rows = lcpp.parse_batched_bench(OUTPUT)
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(32, 64, 1), (32, 64, 32)]
    tok_s, step = lcpp.decode_rate(rows, 32)
    assert tok_s == pytest.approx(32 * 64 / 0.8192) and step == pytest.approx(0.8192 / 64)
    assert lcpp.decode_rate(rows, 1)[0] == pytest.approx(500.0)
    assert lcpp.parse_batched_bench("no rows here\n{not json but no speed}") == []


def test_prefill_rate_is_the_median_of_single_sequence_rows(lcpp):
    rows = [{"pp": 512, "pl": 1, "speed_pp": v} for v in (4000.0, 5000.0, 4500.0)] + \
        [{"pp": 512, "pl": 32, "speed_pp": 1.0}, {"pp": 32, "pl": 1, "speed_pp": 9.0}]
    assert lcpp.prefill_rate(rows, 512) == 4500.0


def test_missing_toolchain_names_what_is_missing(lcpp, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(lcpp.shutil, "which", lambda name: None if name == "cmake" else f"/usr/bin/{name}")
    assert "cmake" in lcpp.missing_toolchain()
    monkeypatch.setattr(lcpp.shutil, "which", lambda name: None if "++" in name else f"/usr/bin/{name}")
    assert "C++ compiler" in lcpp.missing_toolchain()
    monkeypatch.setattr(lcpp.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert lcpp.missing_toolchain() is None


def test_skips_cleanly_without_a_toolchain(monkeypatch, capsys):
    bench = load("bench_llamacpp")
    monkeypatch.setattr(bench.llamacpp, "missing_toolchain", lambda: "cmake is not on PATH")
    monkeypatch.setattr(bench.llamacpp, "ensure_build", lambda **kw: pytest.fail("must not build"))
    assert bench.main(["--no-write"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_our_decode_rate_counts_only_full_decode_steps():
    bench = load("bench_llamacpp")
    ours = bench.Ours.__new__(bench.Ours)
    step = lambda n, admitted: SimpleNamespace(num_seqs=n, admitted=admitted)  # noqa: E731
    # A step from an earlier run, prefill admitting 2 of 3, then 1 more while 2 decode, then 3 decode steps.
    timeline = [(step(1, 0), 0.0), (step(2, 2), 1.0), (step(3, 1), 1.5), (step(3, 0), 1.6), (step(3, 0), 1.8),
                (step(3, 0), 2.1)]
    ours.marks = timeline[:1]
    ours.generate = lambda prompts, new_tokens: ours.marks.extend(timeline[1:])
    tok_s, per_step = ours.decode([[1], [2], [3]], 4)
    assert per_step == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert tok_s == pytest.approx(3 * 3 / 0.6)
