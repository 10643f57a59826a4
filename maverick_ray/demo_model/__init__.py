"""The trained tiny Llama 4 demo model, shipped with the package (see README.md here).

This directory is an HF-layout checkpoint (config.json, model.safetensors, tokenizer files with
the chat template, processor configs) written by `python -m maverick_ray.train train`.
"""

from __future__ import annotations

from pathlib import Path


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint's directory inside the installed package."""
    return Path(__file__).resolve().parent
