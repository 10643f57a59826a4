"""Expert-specialization report: per MoE layer and routed expert, the share of its tokens by domain.

Shape legend: E routed experts, D domains, L MoE layers.

Runs the checkpoint (no grad) over a mixed sample: held-out prose and code windows and new chat
conversations (with pictures), labels every token with one domain (prose, code, chat text,
digits, image patches, chat headers: the special tokens of the chat format), and records each
token's top-1 expert in every MoE layer (argmax of the router's raw logits: Llama 4's top-1).
An expert is specialised for a domain when the domain's share of its tokens is at least 3x the
domain's share of all tokens. Per layer it also gives the busiest expert's token count over the
mean count (1 = even load). Writes a JSON summary and a PNG heatmap (Pillow).

    python -m maverick_ray.train.specialization CKPT --out expert_specialization.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

DOMAINS = ("prose", "code", "chat text", "digits", "image patches", "chat headers")
HEADER_TOKENS = ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>",
                 "<|image_end|>", "<|image|>", "<|tile_x_separator|>", "<|tile_y_separator|>")


def token_domains(seq, tok, digit_ids: set[int], header_ids: set[int], patch_id: int) -> list[int]:
    """One domain index per token of a Sequence (the role names inside headers count as headers)."""
    out, in_header = [], False
    start, end = tok.special_id("<|header_start|>"), tok.special_id("<|header_end|>")
    for i in seq.ids:
        if i == start:
            in_header = True
        if i == patch_id:
            d = "image patches"
        elif in_header or i in header_ids:
            d = "chat headers"
        elif i in digit_ids:
            d = "digits"
        else:
            d = seq.domain if seq.domain in ("prose", "code") else "chat text"
        out.append(DOMAINS.index(d))
        if i == end:
            in_header = False
    return out


@torch.no_grad()
def routing_table(ckpt: Path, windows: int = 24, conversations: int = 150, seed: int = 4321) -> torch.Tensor:
    """(L, E, D) token counts: MoE layer, expert, domain."""
    from ..checkpoint.tokenizer import ChatTokenizer
    from .batches import conversation, held_out_windows
    from .conversations import ChatEncoder
    from .data_text import documents
    from .model import DemoModel

    tok = ChatTokenizer.from_pretrained(ckpt)
    model = DemoModel.from_checkpoint(ckpt)
    cfg = model.cfg
    encoder = ChatEncoder(tok, cfg, ckpt)
    bos = tok.special_id("<|begin_of_text|>")
    held = documents("held_out")
    encs = tok.fast.encode_batch([d.text for d in held], add_special_tokens=False)
    seqs = []
    for domain in ("prose", "code"):
        seqs += held_out_windows([e.ids for d, e in zip(held, encs) if d.domain == domain], windows, 256, bos, domain)
    rng = random.Random(seed)
    seqs += [conversation(encoder, rng, image_share=0.3) for _ in range(conversations)]
    digit_ids = {tok.fast.token_to_id(str(k)) for k in range(10)} - {None}
    header_ids = {tok.special_id(t) for t in HEADER_TOKENS}
    blocks = model.text.moe_blocks
    table = torch.zeros(len(blocks), cfg.text.num_local_experts, len(DOMAINS))
    captured: list[torch.Tensor] = []
    hooks = [b.router.register_forward_hook(lambda m, i, o: captured.append(o.argmax(-1))) for b in blocks]
    for s in seqs:
        captured.clear()
        model(torch.tensor(s.ids), [len(s.ids)], s.pixels)
        dom = torch.tensor(token_domains(s, tok, digit_ids, header_ids, cfg.image_token_id))
        for layer, experts in enumerate(captured):
            table[layer].index_put_((experts, dom), torch.ones(len(dom)), accumulate=True)
    for h in hooks:
        h.remove()
    return table


def summarize(table: torch.Tensor, threshold: float = 3.0) -> dict:
    mix = table.sum(dim=(0, 1)) / table.sum()                       # (D,) corpus share per domain
    share = table / table.sum(-1, keepdim=True).clamp(min=1)        # (L, E, D) share of each expert's tokens
    ratio = share / mix.clamp(min=1e-9)                             # (L, E, D)
    used = table.sum(-1) > 0                                        # (L, E)
    special = (ratio.max(-1).values >= threshold) & used
    layers = []
    for layer in range(table.shape[0]):
        experts = []
        for e in range(table.shape[1]):
            top = int(ratio[layer, e].argmax())
            experts.append({"expert": e, "tokens": int(table[layer, e].sum()),
                            "top_domain": DOMAINS[top], "top_ratio": round(float(ratio[layer, e, top]), 2)})
        load = table[layer].sum(-1)                                 # (E,) tokens per expert
        layers.append({"specialised": int(special[layer].sum()), "used": int(used[layer].sum()),
                       "max_over_mean_load": round(float(load.max() / load.mean().clamp(min=1e-9)), 2),
                       "experts": experts})
    return {"domains": list(DOMAINS), "corpus_mix": [round(float(x), 4) for x in mix], "threshold": threshold,
            "specialised_share": round(float(special.sum() / special.numel()), 3), "layers": layers}


def heatmap(table: torch.Tensor, out: Path, moe_layers: list[int]) -> Path:
    """Rows: experts per MoE layer; columns: domains; cell: share of the expert's tokens / corpus share."""
    from PIL import Image, ImageDraw

    L, E, D = table.shape
    mix = table.sum(dim=(0, 1)) / table.sum()
    ratio = (table / table.sum(-1, keepdim=True).clamp(min=1)) / mix.clamp(min=1e-9)
    cw, ch, left, top = 90, 16, 150, 60
    img = Image.new("RGB", (left + D * cw + 20, top + L * (E * ch + 30) + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "tokens by domain per expert: share / corpus share (dark = 3x or more)", fill="black")
    for j, name in enumerate(DOMAINS):
        d.text((left + j * cw + 4, top - 18), name, fill="black")
    y = top
    for layer in range(L):
        d.text((10, y), f"MoE layer {moe_layers[layer]}", fill="black")
        y += 14
        for e in range(E):
            n = int(table[layer, e].sum())
            d.text((40, y + 2), f"expert {e:2d} ({n})", fill="black")
            for j in range(D):
                v = min(float(ratio[layer, e, j]) / 3.0, 1.0) if n else 0.0
                shade = int(255 * (1 - v))
                d.rectangle([left + j * cw, y, left + (j + 1) * cw - 2, y + ch - 2], fill=(shade, shade, 255))
                if n:
                    d.text((left + j * cw + 4, y + 2), f"{float(ratio[layer, e, j]):.1f}", fill="black" if v < 0.6 else "white")
            y += ch
        y += 16
    out = Path(out)
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m maverick_ray.train.specialization", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path, help="checkpoint directory (e.g. maverick_ray/demo_model)")
    p.add_argument("--out", type=Path, default=Path("expert_specialization.png"), help="PNG to write (JSON beside it)")
    p.add_argument("--windows", type=int, default=24, help="held-out text windows per domain (default: 24)")
    p.add_argument("--conversations", type=int, default=150, help="generated conversations (default: 150)")
    args = p.parse_args(argv)
    from ..config import ModelConfig

    table = routing_table(args.ckpt, args.windows, args.conversations)
    summary = summarize(table)
    moe_layers = [i for i, m in enumerate(ModelConfig.from_pretrained(args.ckpt).text.is_moe) if m]
    heatmap(table, args.out, moe_layers)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}
                     | {"specialised_per_layer": [l["specialised"] for l in summary["layers"]],
                        "max_over_mean_load_per_layer": [l["max_over_mean_load"] for l in summary["layers"]]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
