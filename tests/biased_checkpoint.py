"""A copy of the tiny checkpoint whose greedy output is a given text, for end-to-end tests of what
the server does with a model's output (tool calls) on the real engine.

Every layer's output projection (attention o_proj, the dense MLP's, the experts' and the shared
expert's down projections) is zeroed, so the residual stream is the current token's embedding
and the next token depends on the current token only. lm_head then maps each token of a chain
to the next: the prompt's last token (the "\\n" that ends the assistant header) -> the reply's
tokens -> <|eot|>. The reply is spelled with tokens that are all different (any spelling decodes
to the same text), so the chain never loops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

LAST_PROMPT_TOKEN = "\n"   # a chat prompt with add_generation_prompt ends "<|header_end|>\n\n"
ZEROED = ("self_attn.o_proj.weight", "feed_forward.down_proj.weight", "feed_forward.experts.down_proj",
          "feed_forward.shared_expert.down_proj.weight")


def distinct_spelling(tok, text: str, banned: set[int]) -> list[int]:
    """Token ids, all different and none in `banned`, whose decoded concatenation is `text`."""
    pieces: dict[str, list[int]] = {}
    for i in range(tok.vocab_size):
        s = tok.decode([i], skip_special_tokens=False)
        if s and not s.startswith("<|") and i not in banned:
            pieces.setdefault(s, []).append(i)

    def search(pos: int, used: set[int]) -> list[int] | None:
        if pos == len(text):
            return []
        for end in range(len(text), pos, -1):   # longest piece first
            for i in pieces.get(text[pos:end], []):
                if i not in used:
                    rest = search(end, used | {i})
                    if rest is not None:
                        return [i] + rest
        return None

    ids = search(0, set())
    if ids is None:
        raise ValueError(f"no spelling of {text!r} with distinct tokens in this vocabulary")
    assert tok.decode(ids) == text
    return ids


def write_biased_checkpoint(src: Path, dst: Path, reply: str) -> Path:
    """Copies `src` to `dst` with weights that make greedy chat replies equal `reply`."""
    from safetensors.torch import load_file, save_file

    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.config import ModelConfig

    shutil.copytree(src, dst)
    tok = ChatTokenizer.from_pretrained(dst)
    start = tok.encode(LAST_PROMPT_TOKEN)
    assert len(start) == 1
    chain = start + distinct_spelling(tok, reply, set(start)) + [tok.special_id("<|eot|>")]
    eps = ModelConfig.from_pretrained(dst).text.rms_norm_eps
    f = dst / "model.safetensors"
    w = load_file(str(f))
    for name in w:
        if name.endswith(ZEROED):
            w[name] = torch.zeros_like(w[name])
    emb = w["language_model.model.embed_tokens.weight"]
    norm = w["language_model.model.norm.weight"]
    head = torch.zeros_like(w["language_model.lm_head.weight"])
    for cur, nxt in zip(chain, chain[1:]):
        e = emb[cur]
        h = e * torch.rsqrt(e.pow(2).mean() + eps) * norm       # what reaches lm_head for token `cur`
        head[nxt] = 8.0 * h / h.norm()
    w["language_model.lm_head.weight"] = head
    save_file(w, str(f), metadata={"format": "pt"})
    return dst
