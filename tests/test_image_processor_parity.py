"""Pixel values and prompt ids identical to transformers' Llama 4 image processor and
Llama4Processor. transformers' processor needs torchvision, which cannot sit beside the CPU torch
of the main venv, so it runs in the oracle venv (`make test` builds .venv-oracle) on the same files."""

from __future__ import annotations

import atexit
import base64
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from maverick_ray.checkpoint.tokenizer import ChatTokenizer
from maverick_ray.config import ModelConfig
from maverick_ray.multimodal.images import decode_image, image_tiles
from maverick_ray.multimodal.prompt import chat_prompt_with_images

from image_helpers import image_bytes

ROOT = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("MAVERICK_RAY_ORACLE_PYTHON", ROOT / ".venv-oracle" / "bin" / "python"))
# Llama-4-Maverick-17B-128E-Instruct's preprocessor_config.json (336-pixel tiles, up to 16).
MAVERICK_PREPROCESSOR = {
    "image_processor_type": "Llama4ImageProcessor", "size": {"height": 336, "width": 336}, "max_patches": 16,
    "resize_to_max_canvas": False, "do_resize": True, "resample": 2, "do_rescale": True,
    "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


class _Oracle:
    """One oracle process (tests/oracle/hf_image_processor.py --serve) for the whole session: its
    start, the imports of torch and transformers, costs ~10 s, each job a fraction of that. Each
    job still loads the processor afresh from its directory, as a separate run did."""

    proc: subprocess.Popen | None = None
    log = None

    @classmethod
    def run(cls, job: Path, out: Path) -> None:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.log = tempfile.TemporaryFile(mode="w+")
            cls.proc = subprocess.Popen([str(ORACLE), str(ROOT / "tests" / "oracle" / "hf_image_processor.py"),
                                         "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=cls.log, text=True)
            atexit.register(cls.close)
        cls.proc.stdin.write(json.dumps([str(job), str(out)]) + "\n")
        cls.proc.stdin.flush()
        watchdog = threading.Timer(600, cls.proc.kill)  # a job's time limit, as a run's was
        watchdog.start()
        try:
            for line in cls.proc.stdout:  # lines not starting with "oracle: " are the libraries' own prints
                if line.startswith("oracle: "):
                    answer = line[len("oracle: "):].rstrip("\n")
                    assert answer == "ok", json.loads(answer[len("error "):])[-3000:]
                    return
        finally:
            watchdog.cancel()
        cls.log.seek(0)
        pytest.fail(f"the oracle process exited ({cls.proc.wait()}): {cls.log.read()[-3000:]}")

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.stdin.close()
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()


def oracle(tmp_path: Path, processor_dir: Path, images: list[Path], prompt: str | None = None) -> dict:
    if not ORACLE.exists():
        pytest.fail(f"the oracle venv is missing ({ORACLE}); `make test` creates it")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"processor_dir": str(processor_dir), "images": [str(p) for p in images],
                               "prompt": prompt}))
    _Oracle.run(job, tmp_path / "out.pt")
    return torch.load(tmp_path / "out.pt")


def write_images(tmp_path: Path, specs: list[tuple]) -> list[Path]:
    paths = []
    for i, (w, h, fmt, mode) in enumerate(specs):
        p = tmp_path / f"img{i}.{fmt.lower()}"
        p.write_bytes(image_bytes(w, h, fmt=fmt, mode=mode, seed=i))
        paths.append(p)
    return paths


def translucent_png(tmp_path: Path) -> Path:
    from PIL import Image

    rgba = np.random.default_rng(7).integers(0, 256, (61, 93, 4), dtype=np.uint8)  # alpha varies per pixel
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    return p


def assert_same_pixels(paths: list[Path], ref: dict, tile: int, max_tiles: int) -> None:
    for path, want, grid in zip(paths, ref["pixel_values"], ref["aspect_ratios"]):
        got, ours = image_tiles(decode_image(path.read_bytes()), tile, max_tiles)
        assert ours == grid, path.name
        assert got.shape == want.shape and torch.equal(got, want), \
            f"{path.name}: max diff {(got - want).abs().max().item() if got.shape == want.shape else got.shape}"


# (w, h) -> tile grid (rows, cols) with 56-pixel tiles: 1x1, 1x2, 2x1, 2x2, plus odd shapes.
TINY_SHAPES = [(40, 40, "PNG", "RGB"), (110, 50, "PNG", "RGB"), (50, 110, "PNG", "RGB"), (110, 110, "PNG", "RGB"),
               (333, 77, "PNG", "RGB"), (7, 300, "PNG", "RGB"), (90, 60, "JPEG", "CMYK"), (90, 60, "WEBP", "RGB"),
               (90, 60, "GIF", "P"), (90, 60, "PNG", "LA"), (90, 60, "PNG", "L")]


def test_tiny_pixel_values_identical_to_transformers(tmp_path, tiny_ckpt):
    paths = write_images(tmp_path, TINY_SHAPES) + [translucent_png(tmp_path)]
    ref = oracle(tmp_path, tiny_ckpt, paths)
    assert ref["image_processor"].startswith("Llama4ImageProcessor")
    assert [tuple(g) for g in ref["aspect_ratios"][:4]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    cfg = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    assert_same_pixels(paths, ref, cfg["size"]["height"], cfg["max_patches"])


def test_maverick_pixel_values_identical_to_transformers(tmp_path):
    proc_dir = tmp_path / "maverick"
    proc_dir.mkdir()
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(MAVERICK_PREPROCESSOR))
    paths = write_images(tmp_path, [(336, 336, "PNG", "RGB"), (800, 600, "JPEG", "RGB"), (1500, 300, "PNG", "RGB"),
                                    (200, 1200, "WEBP", "RGB"), (2000, 2000, "PNG", "RGB")])
    ref = oracle(tmp_path, proc_dir, paths)
    assert_same_pixels(paths, ref, 336, 16)


def test_three_image_prompt_identical_to_llama4processor(tmp_path, tiny_ckpt):
    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    paths = write_images(tmp_path, [(40, 40, "PNG", "RGB"), (110, 50, "JPEG", "RGB"), (110, 110, "PNG", "RGB")])
    content = [{"type": "text", "text": "Compare these: "}]
    for p in paths:
        url = f"data:image/{p.suffix[1:]};base64," + base64.b64encode(p.read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    messages = [{"role": "user", "content": content}]
    ids, mm = chat_prompt_with_images(messages, tok, cfg, tiny_ckpt)
    ref = oracle(tmp_path, tiny_ckpt, paths, prompt=tok.render(messages))
    assert ids == ref["input_ids"]
    assert torch.equal(mm["pixel_values"], ref["prompt_pixel_values"])
