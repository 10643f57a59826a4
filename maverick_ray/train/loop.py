"""Trains the demo model: seeded data and init, AdamW with warmup and cosine decay, progress bar,
loss log and curve, and an HF-layout checkpoint at the end.

Shape legend: T tokens of a batch, R trained tokens among them, V vocab, E routed experts.

Before the main loop the vision tower is pre-trained on its own (vision_pretrain.py).

Loss = text_weight * (mean next-token loss on prose and code tokens)
     + image_weight * (mean loss on the answers of conversations with a picture)
     + (1 - text_weight - image_weight) * (mean loss on the other assistant answers)
     + balance_coef * (Switch-style load-balancing term per MoE layer: E * sum_e f_e * p_e, f the
       share of tokens routed to e, p the mean softmax router probability; 0 turns it off).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class TrainArgs:
    out: Path
    steps: int = 2000
    seed: int = 0
    lr: float = 1.2e-3  # 3e-3 learned addition but not to read images (measured: colour answers stayed at chance)
    warmup: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    text_weight: float = 0.3
    # picture answers are few tokens per batch; without their own share, shapes stayed at chance.
    # measured with vision pre-training: 0.35 and 2000 steps gave shape/colour 99.5%, addition 90.0%;
    # 0.25 and 2200 steps gave shape 99%, colour 100%, addition 87%
    image_weight: float = 0.35
    balance_coef: float = 0.01
    # the vision tower first learns shape/colour/count with throw-away linear heads (vision_pretrain.py);
    # measured: without it shapes stayed at chance in 300-400 picture-only steps; after 200 steps of it
    # (13 s), 300 picture-only steps reached shape 96%, colour 100% (300 here for margin)
    vision_pretrain_steps: int = 300
    vision_pretrain_lr: float = 1.2e-3
    # init std of the adapter and projector (other matrices: 0.02); measured in 300 picture-only steps:
    # 0.02 gave colour 40%, 0.1 gave colour 100% (the patch features were ~0.005 in size at 0.02)
    fusion_init_std: float = 0.1
    window: int = 256
    text_windows: int = 1
    chat_tokens: int = 1536
    threads: int = 1  # one thread: these small matmuls gain little from two, and on a shared machine two OpenMP threads ran 9x slower
    progress: bool = True


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class RouterTap:
    """Keeps each MoE router's logits of the current forward (a forward hook on router Linear)."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [b.router.register_forward_hook(lambda m, i, o: self.logits.append(o))
                        for b in model.text.moe_blocks]

    def balance_loss(self) -> torch.Tensor:
        total = 0.0
        for logits in self.logits:                          # (T, E)
            E = logits.shape[-1]
            f = torch.bincount(logits.argmax(-1), minlength=E).float() / logits.shape[0]
            p = logits.softmax(-1).mean(0)
            total = total + E * (f * p).sum()
        self.logits = []
        return total / max(1, len(self.handles))


def losses(model, batch, tap: RouterTap | None) -> dict[str, torch.Tensor]:
    logits = model(batch.ids, batch.lengths, batch.pixels)      # (T, V)
    rows = batch.targets.nonzero().squeeze(1)                    # trained tokens
    per_token = F.cross_entropy(logits[rows - 1], batch.ids[rows], reduction="none")
    text, image = batch.is_text[rows], batch.is_image[rows]
    mean = lambda sel: per_token[sel].mean() if sel.any() else per_token.new_zeros(())  # noqa: E731
    out = {"text": mean(text), "chat": mean(~text & ~image), "image": mean(image)}
    out["balance"] = tap.balance_loss() if tap is not None else torch.zeros(())
    return out


def prepare(a: TrainArgs):
    """Corpus, tokenizer, config and chat encoder; the tokenizer files go to a.out."""
    from ..checkpoint.tokenizer import ChatTokenizer
    from ..checkpoint.writer import config_dict
    from ..config import ModelConfig
    from .architecture import DEMO_TEXT, DEMO_VISION
    from .conversations import ChatEncoder
    from .data_text import documents
    from .tokenizer_train import save_tokenizer_dir, train_tokenizer

    docs = documents("train")
    tok, ids = train_tokenizer(docs, a.seed)
    save_tokenizer_dir(a.out, tok, ids)
    cfg_dict = config_dict(DEMO_TEXT, DEMO_VISION, tok.get_vocab_size(with_added_tokens=True), ids)
    (a.out / "config.json").write_text(json.dumps(cfg_dict, indent=2))  # the encoder reads image sizes
    cfg = ModelConfig.from_dict(cfg_dict)
    encoder = ChatEncoder(ChatTokenizer.from_pretrained(a.out), cfg)
    text_docs = {"prose": [], "code": []}
    for d, enc in zip(docs, tok.encode_batch([d.text for d in docs], add_special_tokens=False)):
        text_docs[d.domain].append(enc.ids)
    return tok, ids, cfg_dict, cfg, encoder, text_docs


def train(a: TrainArgs) -> dict:
    """Runs the whole training; returns the summary also written to a.out/train_log.json."""
    from tqdm import tqdm

    from ..checkpoint.writer import save_checkpoint
    from .batches import Mixture
    from .model import DemoModel
    from .plot import loss_curve
    from .vision_pretrain import pretrain_vision

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok, ids, cfg_dict, cfg, encoder, text_docs = prepare(a)
    mix = Mixture(text_docs, encoder, ids["<|begin_of_text|>"], a.seed, a.window, a.text_windows, a.chat_tokens)
    model = DemoModel(cfg)
    model.init_weights(a.seed, fusion_std=a.fusion_init_std)
    model.train()
    vision_losses = pretrain_vision(model, a.vision_pretrain_steps, a.vision_pretrain_lr, a.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    tap = RouterTap(model) if a.balance_coef > 0 else None
    history = {"text": [], "chat": [], "image": [], "balance": []}
    tokens = 0
    bar = tqdm(range(a.steps), desc="train", disable=not a.progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        batch = mix.batch(step)
        parts = losses(model, batch, tap)
        loss = (a.text_weight * parts["text"] + a.image_weight * parts["image"] + a.balance_coef * parts["balance"]
                + (1 - a.text_weight - a.image_weight) * parts["chat"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(batch.ids.numel())
        for k in history:
            history[k].append(round(float(parts[k].detach()), 4))
        bar.set_postfix(text=f"{history['text'][-1]:.2f}", chat=f"{history['chat'][-1]:.2f}",
                        image=f"{history['image'][-1]:.2f}",
                        tok_s=f"{tokens / (time.time() - t0):.0f}")
    for h in (tap.handles if tap else []):
        h.remove()
    model.eval()
    save_checkpoint(a.out, cfg_dict, model.checkpoint_tensors(), tok, ids)
    tail = lambda k: sum(history[k][-50:]) / len(history[k][-50:])  # noqa: E731
    summary = {"args": {k: str(v) for k, v in asdict(a).items()}, "seconds": round(time.time() - t0, 1),
               "tokens": tokens, "params": sum(p.numel() for p in model.parameters()),
               "final_text_loss": round(tail("text"), 4), "final_chat_loss": round(tail("chat"), 4),
               "final_image_loss": round(tail("image"), 4),
               "vision_pretrain_loss": {"first": vision_losses[:1], "last_20_mean": round(
                   sum(vision_losses[-20:]) / max(1, len(vision_losses[-20:])), 4)},
               "history": history}
    (a.out / "train_log.json").write_text(json.dumps(summary))
    loss_curve({"prose+code loss": history["text"], "chat answer loss": history["chat"],
                "picture answer loss": history["image"]},
               a.out / "loss_curve.png", f"demo model training: {a.steps} steps, seed {a.seed}")
    return summary
