"""llama.cpp for bench_llamacpp.py: build it from the pinned llama-cpp-python sdist, convert a checkpoint to
GGUF, decode greedily, run llama-batched-bench and read its output.

The sdist (PyPI's source release of llama-cpp-python) vendors llama.cpp under vendor/llama.cpp, with
convert_hf_to_gguf.py and gguf-py, and ships the ctypes bindings (llama_cpp/llama_cpp.py) that match that
llama.cpp. Nothing here is installed into the project's environment: the converter and the bindings are put
on sys.path in a subprocess (the converter needs numpy, torch, transformers, pyyaml, tqdm and requests,
which the project already has). The build lives under the project's cache dir, keyed by version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"          # pinned: the sdist's vendored llama.cpp is what gets measured
TARGETS = ("llama-batched-bench", "llama")   # the timing tool and libllama.so (greedy decoding via ctypes)
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_CCACHE=OFF")


def home(version: str = LLAMA_CPP_PYTHON) -> Path:
    from maverick_ray.cache_dir import cache_root

    return cache_root() / f"llama.cpp-{version}"


def missing_toolchain() -> str | None:
    """Why llama.cpp cannot be built here (no cmake, C or C++ compiler), or None."""
    if not shutil.which("cmake"):
        return "cmake is not on PATH"
    for env, names, what in (("CC", ("cc", "gcc", "clang"), "C"), ("CXX", ("c++", "g++", "clang++"), "C++")):
        cands = [os.environ[env]] if os.environ.get(env) else list(names)
        if not any(shutil.which(c) for c in cands):
            return f"no {what} compiler on PATH (looked for {', '.join(cands)})"
    return None


@dataclass
class LlamaCpp:
    src: Path            # the extracted sdist
    bin: Path            # build/bin: llama-batched-bench and the shared libraries

    @property
    def vendor(self) -> Path:
        return self.src / "vendor" / "llama.cpp"

    @property
    def batched_bench(self) -> Path:
        return self.bin / "llama-batched-bench"


def _src(root: Path, version: str) -> Path:
    """Where the extracted sdist of `version` lives under the build cache `root`."""
    return root / f"llama_cpp_python-{version}"


def _sdist(root: Path, version: str, sdist: str | None) -> Path:
    src = _src(root, version)
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if sdist is None:
            print(f"downloading the llama-cpp-python {version} sdist (pip) ...", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", tmp], check=True, stdout=subprocess.DEVNULL)
            sdist = str(next(Path(tmp).glob("*.tar.gz")))
        print(f"extracting {Path(sdist).name} ...", flush=True)
        with tarfile.open(sdist) as tar:
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **kw)
        shutil.rmtree(src, ignore_errors=True)
        os.rename(Path(tmp) / src.name, src)
    return src


def _build_wanted(version: str) -> dict:
    return {"version": version, "flags": list(CMAKE_FLAGS), "targets": list(TARGETS)}


def cached_build(version: str = LLAMA_CPP_PYTHON) -> LlamaCpp | None:
    """The cached build when one of this version and these flags is complete, else None (builds nothing)."""
    root = home(version)
    build = root / "build"
    marker = build / "maverick-built.json"
    lc = LlamaCpp(_src(root, version), build / "bin")
    if (marker.exists() and json.loads(marker.read_text()) == _build_wanted(version) and lc.batched_bench.exists()
            and (lc.vendor / "convert_hf_to_gguf.py").exists()):
        return lc
    return None


def ensure_build(version: str = LLAMA_CPP_PYTHON, sdist: str | None = None, jobs: int | None = None) -> LlamaCpp:
    """The cached build, made first if missing (about 10 minutes on 2 cores; progress printed)."""
    found = cached_build(version)
    if found is not None:
        return found
    root = home(version)
    src = _sdist(root, version, sdist)
    build = root / "build"
    marker = build / "maverick-built.json"
    want = _build_wanted(version)
    lc = LlamaCpp(src, build / "bin")
    log = root / "build.log"
    print(f"building llama.cpp ({', '.join(TARGETS)}) in {build}; full log in {log}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        for step in (["cmake", "-S", str(lc.vendor), "-B", str(build), *CMAKE_FLAGS],
                     ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 1)]):
            f.write("$ " + " ".join(step) + "\n")
            proc = subprocess.Popen(step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            shown = -10
            for line in proc.stdout:
                f.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m and int(m.group(1)) >= shown + 10:   # a line every 10%
                    shown = int(m.group(1))
                    print(f"  [{time.time() - t0:5.0f} s] {line.strip()[:110]}", flush=True)
            if proc.wait() != 0:
                raise RuntimeError(f"llama.cpp build step failed: {' '.join(step)}\n"
                                   + "".join(open(log).readlines()[-30:]))
    marker.write_text(json.dumps(want))
    print(f"built llama.cpp in {time.time() - t0:.0f} s", flush=True)
    return lc


def bypass_tokenizer_hash_check(pre: str = "gpt-2") -> None:
    """The converter names a BPE tokenizer's pre-tokenizer by hashing the ids it gives a test string, and refuses
    a hash it does not know. The generated checkpoints' tokenizer (byte-level BPE trained on a small corpus,
    checkpoint/tokenizer_build.py) is on no list; its pre-tokenizer is ByteLevel's GPT-2 split, llama.cpp's
    "gpt-2". Patched in the converter's process only; the sdist's files are left as they are."""
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre


def convert_in_process(vendor: str, checkpoint: str, out: str) -> str:
    """checkpoint -> f32 GGUF with the vendored converter (run through common.in_subprocess)."""
    import runpy

    sys.path[:0] = [str(Path(vendor) / "gguf-py"), vendor]
    bypass_tokenizer_hash_check()
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outtype", "f32", "--outfile", out]
    runpy.run_path(str(Path(vendor) / "convert_hf_to_gguf.py"), run_name="__main__")
    return out


def _bindings(src: str, lib_dir: str):
    """The sdist's ctypes bindings over our build's libllama.so, without the package's __init__ (which pulls in
    the high-level API and its extra dependencies)."""
    import importlib
    import types

    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(Path(src) / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def greedy_in_process(src: str, lib_dir: str, gguf: str, prompts: list[list[int]], new_tokens: int,
                      threads: int, texts: list[str]) -> dict:
    """llama.cpp at our numerics (f32 KV cache, flash attention off): greedy continuations of each prompt (token
    ids in, argmax of the logits each step, one sequence at a time), and how its tokenizer splits `texts`.
    Run through common.in_subprocess."""
    import numpy as np

    L = _bindings(src, lib_dir)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = -(-(max(map(len, prompts)) + new_tokens) // 256) * 256
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = L.GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    outs = []
    for prompt in prompts:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        out, feed = [], prompt
        for _ in range(new_tokens):
            arr = (L.llama_token * len(feed))(*feed)
            if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(feed))) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            feed = [out[-1]]
        outs.append(out)
    tokenized = []
    for text in texts:
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
        tokenized.append(list(buf[:n]))
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {"outs": outs, "tokenized": tokenized}


def parse_batched_bench(text: str) -> list[dict]:
    """llama-batched-bench --output-format jsonl: one JSON object per (pp, tg, pl) line, among log lines."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    return rows


def decode_rate(rows: list[dict], pl: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) of the generation phase at `pl` parallel sequences: pl*tg tokens in
    t_tg seconds over tg steps."""
    r = next(r for r in rows if r["pl"] == pl)
    return r["pl"] * r["tg"] / r["t_tg"], r["t_tg"] / r["tg"]


def prefill_rate(rows: list[dict], pp: int) -> float:
    """Median prompt tokens/s over the single-sequence rows with a prompt of `pp` tokens."""
    import statistics

    return statistics.median(r["speed_pp"] for r in rows if r["pp"] == pp and r["pl"] == 1)


def batched_bench(lc: LlamaCpp, gguf: Path, threads: int, pp: list[int], tg: int, npl: list[int],
                  equal_numerics: bool, timeout: float = 600) -> list[dict]:
    """One llama-batched-bench run (every pp x npl pair, prompts not shared, random tokens); llama.cpp's
    defaults, or with equal_numerics its KV cache in f32 and flash attention off (our engine's numerics)."""
    ctx = max(npl) * (-(-(max(pp) + tg) // 256) * 256)   # per-sequence context, in llama.cpp's 256-cell pad
    cmd = [str(lc.batched_bench), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
           "-npp", ",".join(map(str, pp)), "-ntg", str(tg), "-npl", ",".join(map(str, npl)),
           "--output-format", "jsonl"]
    if equal_numerics:
        cmd += ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = parse_batched_bench(out.stdout + "\n" + out.stderr)
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return rows


class OtherLoad:
    """CPU time the rest of the machine used while this runs: /proc/stat's busy time less this process's and
    its waited-for children's (os.times), in cores on average. None where /proc/stat is missing."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except OSError:
            return None
        busy = (f[0] + f[1] + f[2] + sum(f[5:8])) / os.sysconf("SC_CLK_TCK")   # user nice system irq softirq steal
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / (end[0] - self.start[0]))
