"""Shared benchmark pieces: the machine's floor rates, medians, and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

BENCH_FILE = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mini_text_config(context: int = 131072):
    """The `mini` preset's TextConfig with a long context (for benchmarks of long-context pieces
    that need no checkpoint)."""
    from maverick_ray.checkpoint.presets import PRESETS
    from maverick_ray.config import TextConfig

    return TextConfig.from_dict({**PRESETS["mini"][0], "vocab_size": 640, "max_position_embeddings": context})


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a square matmul (the machine's compute ceiling for these kernels)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, repeats)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s streamed by a sum over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4)
    return nbytes / median_time(lambda: x.sum(), repeats)


def in_subprocess(module: str, function: str, *args):
    """Runs benchmarks/<module>.<function>(*args) in a fresh Python and returns its JSON result.

    Benchmarks that drive an engine keep torch compute off their own main thread: on CPU each
    thread that computes gets its own OpenMP team, and once a process holds more OpenMP threads
    than cores, libgomp sleeps between parallel regions instead of spinning, which slowed the
    engine's decode step about 3x (BENCHMARKS.md). Reference runs and machine rates go here.
    """
    import json
    import subprocess
    import sys

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from {module} import {function} as f; "
            f"print('RESULT ' + json.dumps(f(*json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) if isinstance(a, Path) else a for a in args])],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed in a subprocess:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def machine_rates() -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s), for use through in_subprocess."""
    return matmul_rate(), memory_bandwidth()


def cpu_name() -> str:
    """The CPU's model name and widest x86 vector extension from /proc/cpuinfo (e.g. "AMD EPYC,
    avx512"): hosts of different kinds rank BLAS and llama.cpp differently (BENCHMARKS.md), so
    figures name the kind they were measured on. The bare machine type where there is no cpuinfo."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "")
    return ", ".join(x for x in (model or platform.machine(), isa.replace("avx512f", "avx512")) if x)


def machine_line() -> str:
    return (f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}")


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section between this benchmark's markers in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCH_FILE.read_text() if BENCH_FILE.exists() else (
        "# Benchmarks\n\nFigures from the scripts in `benchmarks/`; each section names the command that "
        "produced it. Ratios are measured side by side in one run; times are medians over repeats.\n")
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_FILE.write_text(text)
