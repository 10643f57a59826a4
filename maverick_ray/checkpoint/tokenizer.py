"""The checkpoint's tokenizer, loaded through transformers, and chat prompts rendered with the
checkpoint's own chat template exactly as transformers' `apply_chat_template` renders them.

Encode and decode (every prompt, and the engine's decode of every generated token) call the
Rust `tokenizers` object underneath transformers' tokenizer (`backend_tokenizer`) directly: the
same vocabulary, normalizer and pre-tokenizer, without transformers' Python wrapper.
Measured with benchmarks/bench_tokenizer.py on the tiny checkpoint (shared 2-core CPU, median
us per call, tokenizers vs transformers): encoding a 787-character chat prompt 401 vs 430 (1.1x),
a 25-character text 15.7 vs 43.5 (2.8x), decoding 64 ids (the engine decodes the output after
every token) 11.7 vs 23.8 (2.0x). So the fast path stays; both give the same ids and text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .chat_messages import template_messages
from .chat_template import NO_TEMPLATE, RESERVED_KWARGS, ChatTemplateError, load_override, processor_template
from .errors import CheckpointError


class ChatTokenizer:
    """`from_pretrained(ckpt, chat_template=None)`; then `encode`, `decode`, `render` (the chat
    prompt as text) and `apply_chat_template` (as token ids)."""

    def __init__(self, hf_tokenizer, chat_template: str | None, template_source: str):
        self.hf = hf_tokenizer
        self.fast = hf_tokenizer.backend_tokenizer   # tokenizers.Tokenizer: the hot path
        self.bos_token: str = hf_tokenizer.bos_token or "<|begin_of_text|>"
        self.chat_template = chat_template
        self.template_source = template_source       # where the template came from (logs, errors)
        # transformers' decode also cleans up spaces when the checkpoint asks for it; then use it.
        self._hf_decode = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> "ChatTokenizer":
        """Loads the checkpoint's tokenizer with transformers' AutoTokenizer. `chat_template`
        (a file or the template text) overrides the checkpoint's template. Raises CheckpointError
        when there is no readable tokenizer, ConfigError for a bad override or a template that
        does not compile."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise CheckpointError(f"tokenizer.json: not found in {path}; this checkpoint has no tokenizer "
                                  "(use --token-ids to pass raw token ids)")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises many kinds; all mean "cannot load it"
            raise CheckpointError(f"tokenizer: cannot be loaded from {path} ({type(e).__name__}: {e})") from None
        if not hasattr(hf, "backend_tokenizer"):
            raise CheckpointError(f"tokenizer: {path} has no fast tokenizer (tokenizer.json) transformers can use")
        if chat_template:
            template, source = load_override(chat_template), "override"
        elif hf.chat_template:
            template, source = None, "checkpoint"  # transformers picks among named templates itself
        else:
            template = processor_template(path)
            source = "chat_template.json" if template else "none"
        tok = cls(hf, template, source)
        tok._check_compiles()
        return tok

    # ---- encode / decode (hot path) -------------------------------------------------------------
    def special_id(self, name: str) -> int:
        i = self.fast.token_to_id(name)
        if i is None:
            raise CheckpointError(f"tokenizer.json: has no special token {name}")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.fast.encode(text, add_special_tokens=False).ids
        return [self.special_id(self.bos_token)] + ids if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf_decode:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's vocabulary entry (vLLM's /tokenize `token_strs`)."""
        return self.hf.convert_ids_to_tokens(ids)

    @property
    def vocab_size(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True)

    # ---- chat template ------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return self.source_has_template(self.template_source)

    @staticmethod
    def source_has_template(source: str) -> bool:
        return source != "none"

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat prompt as text, rendered by transformers' apply_chat_template with the
        template (image parts appear as the template's image placeholder). Raises
        ChatTemplateError (a client error) when it cannot be rendered."""
        if not self.has_chat_template:
            raise ChatTemplateError(NO_TEMPLATE)
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(RESERVED_KWARGS & set(kwargs))
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(reserved)}; use the request "
                                    "field of that name")
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError("add_generation_prompt and continue_final_message cannot both be true")
        try:
            return self.hf.apply_chat_template(
                template_messages(messages), tools=tools or None, chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=False, **kwargs)
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja's TemplateError (raise_exception included), ValueError, TypeError ...
            raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]], **render_kwargs) -> list[int]:
        """render(...) as token ids (the template writes the special tokens itself)."""
        return self.encode(self.render(messages, **render_kwargs))

    def _check_compiles(self) -> None:
        """A template with a syntax error fails at start-up, not on the first request."""
        if not self.has_chat_template:
            return
        from jinja2 import TemplateSyntaxError

        from ..config import ConfigError

        try:
            self.hf.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=self.chat_template,
                                        add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError as e:
            raise ConfigError(f"chat template ({self.template_source}): does not compile: {e}") from None
        except Exception:  # noqa: S110 (a template may refuse this probe conversation; requests will tell)
            pass
