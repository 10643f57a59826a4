"""Vision tower + projector against transformers' Llama 4 (the oracle) on the tiny checkpoint."""

from __future__ import annotations

import torch

from maverick_ray.checkpoint.loader import load_state_dict
from maverick_ray.config import ModelConfig
from maverick_ray.model.vision import VisionModel


def test_image_features_match_transformers(tiny_ckpt):
    from transformers import Llama4ForConditionalGeneration

    hf = Llama4ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    ours = VisionModel(cfg).eval()
    state = {k: v for k, v in load_state_dict(tiny_ckpt, cfg, progress=False).items()
             if k.startswith(("vision_model.", "multi_modal_projector."))}
    ours.load_state_dict(state)
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = hf.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
        ref = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        got = ours(pixels)
    assert got.shape == (3 * cfg.vision.tokens_per_tile, cfg.text.hidden_size)
    assert (got - ref).abs().max() <= 1e-4


def test_image_prompt_greedy_matches_transformers_and_fuses_in_order(tiny_ckpt):
    from transformers import Llama4ForConditionalGeneration

    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.multimodal import prepare_images_from_files
    from maverick_ray.engine.sampling import SamplingParams

    from image_helpers import image_bytes

    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    paths = []
    for i, size in enumerate([(110, 50), (40, 40)]):
        p = tiny_ckpt.parent / f"img{i}.png"
        p.write_bytes(image_bytes(*size, seed=i))
        paths.append(str(p))
    ids, mm = prepare_images_from_files(tiny_ckpt, tok, paths, "What is in these images?", 8)
    hf = Llama4ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values=mm["pixel_values"], max_new_tokens=8,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        swapped = hf.generate(input_ids=torch.tensor([ids]), pixel_values=mm["pixel_values"].flip(0),
                              max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=256)) as eng:
        got = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), mm_inputs=mm)
        text_only = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert eng.ranks.worker.vision is not None
    assert got["token_ids"] == ref
    assert text_only["token_ids"] != ref or swapped.tolist() != ref, "images had no effect on the output"


def test_text_only_requests_never_build_the_vision_tower(tiny_ckpt):
    from maverick_ray.config import EngineConfig, ParallelConfig
    from maverick_ray.engine.engine import Engine
    from maverick_ray.engine.sampling import SamplingParams

    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=2, max_model_len=64)) as eng:
        eng.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
        assert eng.ranks.worker.vision is None
