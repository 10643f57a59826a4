"""Held-out evaluation of a demo checkpoint, through the serving engine.

- image QA: new pictures (a seed never used in training) of one shape; "What shape is in the
  image?" and "What colour is the shape?", greedy, exact match of the answer;
- 2-digit addition on the pairs held out of training ("What is a+b?"), exact match;
- prose and code: per-token perplexity on windows of held-out documents (stdlib modules and
  pydoc topics never trained on), against a unigram model of the training tokens (add-one
  smoothing): the unigram perplexity is what a model that ignores context reaches.
Questions go through the engine (`Engine.generate`) with the prompts the server builds
(`ChatTokenizer.apply_chat_template`, `multimodal/prompt.py: chat_prompt_with_images`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from .data_chat import EVAL_ADDITION_TEMPLATE, held_out_additions
from .data_images import COLOURS, png_bytes, render, single_scene


def _engine(ckpt: Path, tokenizer):
    """An in-process engine (EP 1) that detokenizes with the checkpoint's tokenizer."""
    from ..config import EngineConfig, ParallelConfig
    from ..engine.engine import Engine

    return Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_model_len=512), tokenizer=tokenizer)


def _answer(eng, ids, mm=None, max_tokens: int = 8) -> str:
    from ..engine.sampling import SamplingParams

    return eng.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0), mm_inputs=mm)["text"].strip()


def image_questions(n: int, seed: int) -> list[tuple[bytes, str, str]]:
    """n new single-shape pictures, each asked its shape and its colour: (png, question, answer)."""
    rng = random.Random(f"eval-images:{seed}")
    out = []
    for _ in range(n):
        scene = single_scene(rng)
        png = png_bytes(render(scene, 64, rng))
        out.append((png, "What shape is in the image?", scene.items[0].shape))
        out.append((png, "What colour is the shape?", scene.items[0].colour))
    return out


def addition_questions(n: int, seed: int) -> list[tuple[str, str]]:
    pairs = held_out_additions()
    random.Random(f"eval-add:{seed}").shuffle(pairs)
    return [(EVAL_ADDITION_TEMPLATE.format(a=a, b=b), str(a + b)) for a, b in pairs[:n]]


@torch.no_grad()
def perplexities(ckpt: Path, windows: int) -> dict:
    """Held-out prose and code perplexity of the model and of a unigram baseline."""
    from ..checkpoint.tokenizer import ChatTokenizer
    from .batches import held_out_windows
    from .data_text import documents
    from .model import DemoModel

    tok = ChatTokenizer.from_pretrained(ckpt)
    model = DemoModel.from_checkpoint(ckpt)
    bos = tok.special_id("<|begin_of_text|>")
    V = tok.vocab_size
    counts = torch.ones(V)  # add-one smoothing
    for enc in tok.fast.encode_batch([d.text for d in documents("train")], add_special_tokens=False):
        counts += torch.bincount(torch.tensor(enc.ids, dtype=torch.long), minlength=V).float()
    unigram_logp = (counts / counts.sum()).log()
    held = documents("held_out")
    out = {}
    for domain in ("prose", "code"):
        docs = [e.ids for d, e in zip(held, tok.fast.encode_batch([d.text for d in held], add_special_tokens=False))
                if d.domain == domain]
        seqs = held_out_windows(docs, windows, 256, bos, domain)
        nll, uni, n = 0.0, 0.0, 0
        for s in seqs:
            ids = torch.tensor(s.ids)
            logits = model(ids, [len(s.ids)])                                  # (L, V)
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
            uni -= float(unigram_logp[ids[1:]].sum())
            n += len(s.ids) - 1
        out[domain] = {"tokens": n, "perplexity": round(math.exp(nll / n), 2),
                       "unigram_perplexity": round(math.exp(uni / n), 2)}
    return out


def evaluate(ckpt: Path, n: int = 200, windows: int = 32, seed: int = 1234, progress: bool = True) -> dict:
    """Scores of `ckpt` (see the module docstring); n pictures (two questions each), n sums,
    `windows` held-out windows per text domain (0: no perplexities)."""
    from tqdm import tqdm

    from ..checkpoint.tokenizer import ChatTokenizer
    from ..config import ModelConfig
    from ..multimodal.prompt import chat_prompt_with_images

    ckpt = Path(ckpt)
    tok = ChatTokenizer.from_pretrained(ckpt)
    cfg = ModelConfig.from_pretrained(ckpt)
    results, misses = {}, {}
    with _engine(ckpt, tok) as eng:
        right = {"shape": [0, 0], "colour": [0, 0]}
        for png, q, a in tqdm(image_questions(n, seed), desc="image QA", disable=not progress):
            kind = "colour" if a in COLOURS else "shape"
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            ids, mm = chat_prompt_with_images(msgs, tok, cfg, ckpt, images=[png])
            got = _answer(eng, ids, mm)
            right[kind][0] += got == a
            right[kind][1] += 1
            if got != a:
                misses.setdefault(f"image_{kind}", []).append(f"{a} -> {got}")
        for kind, (ok, total) in right.items():
            results[f"image_{kind}_accuracy"] = round(ok / total, 4)
        ok = 0
        questions = addition_questions(n, seed)
        for q, a in tqdm(questions, desc="addition", disable=not progress):
            got = _answer(eng, tok.apply_chat_template([{"role": "user", "content": q}]))
            ok += got == a
            if got != a:
                misses.setdefault("addition", []).append(f"{q} {a} -> {got}")
        results["addition_accuracy"] = round(ok / len(questions), 4)
    if windows:
        results["perplexity"] = perplexities(ckpt, windows)
    results["misses"] = {k: v[:10] for k, v in misses.items()}
    return results
