"""Which chat template a server renders, and the errors rendering can raise.

The template is, in this order:
1. the operator's override: `--chat-template FILE` (`generate`, `serve`) or the `chat_template`
   Serve arg, a file path or, as vLLM also accepts, the template text itself;
2. the checkpoint's own, as transformers' tokenizer loads it (`chat_template` of
   tokenizer_config.json, chat_template.jinja, or the chat_templates/ folder);
3. the checkpoint's processor template, chat_template.json (`{"chat_template": "..."}`).
A checkpoint with none of them serves completions; chat requests get a 400 that says how to
give it one (ChatTemplateError).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError

# Names a request's chat_template_kwargs may not set: the renderer's own arguments.
RESERVED_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "chat_template", "tokenize",
                             "add_generation_prompt", "continue_final_message", "return_dict", "padding",
                             "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask",
                             "tokenizer_kwargs", "sanitize_control_tokens"})


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (no template, the template raised, bad arguments): a
    client error (HTTP 400) whose message says why."""


def load_override(value: str) -> str:
    """The template text of `--chat-template` / the `chat_template` Serve arg: a readable file,
    or text that is a template itself. Raises ConfigError naming the problem."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError as e:
        raise ConfigError(f"chat_template: cannot read {path} ({e.strerror})") from None
    if any(c in value for c in "{}\n"):
        return value
    raise ConfigError(f"chat_template: {value} is not a file (pass a Jinja chat template file, or the template text)")


def processor_template(ckpt: Path) -> str | None:
    """chat_template.json's template (the processor's, in older multimodal checkpoints), or None."""
    f = Path(ckpt) / "chat_template.json"
    if not f.is_file():
        return None
    try:
        value = json.loads(f.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError, OSError):
        return None
    return value if isinstance(value, str) and value.strip() else None


NO_TEMPLATE = ("this model's checkpoint has no chat template (tokenizer_config.json, chat_template.jinja or "
               "chat_template.json); start the server with --chat-template FILE (or the chat_template Serve arg), "
               "or send the prompt to /v1/completions")
