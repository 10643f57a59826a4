"""Runtime tokenizer on the `tokenizers` library (light import) with Llama 4's chat format.

    <|begin_of_text|><|header_start|>ROLE<|header_end|>\\n\\nCONTENT<|eot|>...
    <|header_start|>assistant<|header_end|>\\n\\n      (generation prompt)

Image parts become `<|image|>` here; the multimodal prompt builder expands each into the tile
layout of patch tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

ROLES = ("system", "user", "assistant", "developer", "tool", "ipython")  # the chat roles, for the API too


class Llama4Tokenizer:
    def __init__(self, tokenizer, bos_token: str = "<|begin_of_text|>"):
        self.tok = tokenizer
        self.bos_token = bos_token

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Llama4Tokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        f = path / "tokenizer.json"
        if not f.exists():
            raise CheckpointError(f"tokenizer.json: not found in {path}; this checkpoint has no tokenizer "
                                  "(use --token-ids to pass raw token ids)")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:
            raise CheckpointError(f"tokenizer.json: cannot be read ({f}: {e})") from None
        bos = "<|begin_of_text|>"
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            b = json.loads(cfg_file.read_text()).get("bos_token")
            bos = b.get("content", bos) if isinstance(b, dict) else (b or bos)
        return cls(tok, bos)

    def special_id(self, name: str) -> int:
        i = self.tok.token_to_id(name)
        if i is None:
            raise CheckpointError(f"tokenizer.json: has no special token {name}")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.special_id(self.bos_token)] + ids if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat-formatted prompt as text (image parts as <|image|>)."""
        out = [self.bos_token]
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
            out.append(f"<|header_start|>{role}<|header_end|>\n\n")
            content = m.get("content")
            if content is None:
                content = ""
            if isinstance(content, str):
                out.append(content)
            else:
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        out.append(part["text"])
                    elif kind in ("image", "image_url"):
                        out.append("<|image|>")
                    else:
                        raise ValueError(f"messages[{i}]: unsupported content part type {kind!r}")
            out.append("<|eot|>")
        if add_generation_prompt:
            out.append("<|header_start|>assistant<|header_end|>\n\n")
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))
