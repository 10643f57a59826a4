"""Compiles a C kernel of this package into a shared library once and loads it with ctypes.

The library is cached under <cache>/native/ (cache: $MAVERICK_RAY_CACHE, else
$XDG_CACHE_HOME/maverick-ray, else ~/.cache/maverick-ray), keyed by a hash of the source, the
flags and the compiler's version, so an edited kernel or a different compiler builds afresh.
Builds land atomically (write, then rename): concurrent workers on one node may both compile,
never load a half-written file. Compiling takes about a second with gcc.

Kernels are optional: `load` returns None and logs why when no C compiler is found
($CC, else cc/gcc/clang) or the build fails, and callers then use their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..cache_dir import cache_root

log = logging.getLogger(__name__)

# -fopenmp: the library's parallel regions use the OpenMP runtime torch has already loaded
# (libgomp.so.1 resolves to torch's copy), so kernels and torch share one thread pool.
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11"]

# Libraries linked from several sources: the first is the library's own, the rest are the other
# kernels it calls (each also builds on its own).
SOURCES = {"decode_layer": ("decode_layer", "rms_norm", "attention_prologue", "paged_attention", "grouped_experts")}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def find_compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(name: str, cc: str | None = None, out_dir: Path | None = None) -> Path:
    """Compiles native/<name>.c, with the kernels SOURCES names for it, if not cached, and returns
    the library's path. Raises RuntimeError with the compiler's message when it cannot."""
    cc = cc or find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    sources = [Path(__file__).with_name(f"{s}.c") for s in SOURCES.get(name, (name,))]
    text = b"".join(s.read_bytes() for s in sources)
    key = hashlib.sha256(text + " ".join(CFLAGS).encode() + _compiler_version(cc).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "native"
    target = out_dir / f"{name}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed on {sources[0].name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library `name`, built on first use; None (logged once) if it cannot be."""
    with _lock:
        if name not in _loaded:
            try:
                import torch  # noqa: F401  (its OpenMP runtime must be the one the library binds to)

                _loaded[name] = ctypes.CDLL(str(build(name)))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log.warning("native kernel %s unavailable, using the torch path: %s", name, exc)
                _loaded[name] = None
        return _loaded[name]
