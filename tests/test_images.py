"""Image decoding, tiling and the prompt layout."""

from __future__ import annotations

import base64

import pytest

from maverick_ray.checkpoint.tokenizer import ChatTokenizer
from maverick_ray.config import ModelConfig
from maverick_ray.multimodal.images import ImageError, decode_image, image_tiles
from maverick_ray.multimodal.prompt import chat_prompt_with_images, image_layout

from image_helpers import image_bytes

GRIDS = {(40, 40): (1, 1), (110, 50): (1, 2), (50, 110): (2, 1), (110, 110): (2, 2)}  # (w, h) -> (rows, cols)


@pytest.mark.parametrize("size,grid", list(GRIDS.items()))
def test_tile_grid_and_layout_match_transformers_processor(size, grid):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    tiles, got = image_tiles(decode_image(image_bytes(*size)), tile=56, max_tiles=16)
    assert got == grid
    n = grid[0] * grid[1]
    assert tiles.shape == (n + (n > 1), 3, 56, 56)
    assert tiles.min() >= -1 and tiles.max() <= 1
    assert image_layout(*grid, 4) == Llama4Processor._prompt_split_image(None, grid, 4)


def test_formats_and_modes_decode_to_rgb():
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("JPEG", "CMYK"), ("WEBP", "RGB"), ("GIF", "P")]:
        img = decode_image(image_bytes(30, 20, fmt, mode))
        assert img.mode == "RGB" and img.size == (30, 20)


def test_bad_images_give_clear_errors():
    png = image_bytes(64, 64)
    cases = [(b"", "empty"), (png[: len(png) // 2], "truncated or corrupt"), (b"hello, not an image", "not an image")]
    for data, msg in cases:
        with pytest.raises(ImageError, match=f"image 3: .*{msg}"):
            decode_image(data, index=3)
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(image_bytes(200, 200), index=0, max_pixels=10_000)


def test_prompt_with_three_images(tiny_ckpt):
    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    sizes = [(40, 40), (110, 50), (110, 110)]
    content = [{"type": "text", "text": "Compare "}]
    for s in sizes:
        url = "data:image/png;base64," + base64.b64encode(image_bytes(*s)).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    ids, mm = chat_prompt_with_images([{"role": "user", "content": content}], tok, cfg, tiny_ckpt)
    assert mm["pixel_values"].shape[0] == 1 + 3 + 5
    assert ids.count(cfg.image_token_id) == (1 + 3 + 5) * cfg.vision.tokens_per_tile
    assert ids.count(tok.special_id("<|image_start|>")) == 3


@pytest.mark.parametrize("url,msg", [
    ("data:image/png;base64,@@notbase64@@", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("https://example.com/cat.png", "remote image URLs are disabled"),
])
def test_bad_image_urls(tiny_ckpt, url, msg):
    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(ImageError, match=msg):
        chat_prompt_with_images(msgs, tok, cfg, tiny_ckpt)


def test_too_many_images(tiny_ckpt):
    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    url = "data:image/png;base64," + base64.b64encode(image_bytes(20, 20)).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}]
    with pytest.raises(ImageError, match="at most 2"):
        chat_prompt_with_images(msgs, tok, cfg, tiny_ckpt, max_images=2)


def test_images_for_a_checkpoint_without_vision_tower(tmp_path, tiny_ckpt):
    import json
    import shutil

    ck = tmp_path / "textonly"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("vision_config")
    (ck / "config.json").write_text(json.dumps(cfg))
    tok = ChatTokenizer.from_pretrained(ck)
    url = "data:image/png;base64," + base64.b64encode(image_bytes(20, 20)).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(ImageError, match="no vision tower"):
        chat_prompt_with_images(msgs, tok, ModelConfig.from_pretrained(ck), ck)


def test_cli_generate_with_images(tmp_path, tiny_ckpt):
    import json
    import subprocess
    import sys

    from cli_helpers import run_cli_here

    imgs = []
    for i, size in enumerate([(110, 50), (40, 40)]):
        p = tmp_path / f"i{i}.png"
        p.write_bytes(image_bytes(*size, seed=i))
        imgs += ["--image", str(p)]
    base = [sys.executable, "-m", "maverick_ray.cli", "generate", "--model", str(tiny_ckpt), "--prompt", "What?",
            "--max-tokens", "5", "--json"]
    r = subprocess.run(base + imgs, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) <= 5
    # The refusals in this process (tests/cli_helpers.py: the same status and stderr, no new interpreter).
    r = run_cli_here(*base[3:], *imgs, "--max-images", "1")
    assert r.returncode == 2 and "at most 1" in r.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    r = run_cli_here(*base[3:], "--image", str(bad))
    assert r.returncode == 2 and "image 0: is not an image" in r.stderr and "Traceback" not in r.stderr


def test_tiny_checkpoint_carries_processor_configs(tiny_ckpt):
    import json

    from maverick_ray.multimodal.prompt import max_tiles_of

    pre = json.loads((tiny_ckpt / "preprocessor_config.json").read_text())
    proc = json.loads((tiny_ckpt / "processor_config.json").read_text())
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    assert pre["size"] == {"height": cfg.vision.image_size, "width": cfg.vision.image_size}
    assert proc["patch_size"] == cfg.vision.patch_size and proc["pixel_shuffle_ratio"] == 0.5
    assert max_tiles_of(tiny_ckpt) == pre["max_patches"]
    # The processor's patch count per tile is the vision tower's token count per tile.
    side = cfg.vision.image_size // proc["patch_size"]
    assert side * side // round(1 / proc["pixel_shuffle_ratio"] ** 2) == cfg.vision.tokens_per_tile
