"""The chat request fields that shape the prompt and the reading of the output: `tools`,
`tool_choice`, `parallel_tool_calls`, `chat_template_kwargs`, `add_generation_prompt`,
`continue_final_message` (as vLLM's OpenAI server takes them), validated with a 400 naming the
field.

tool_choice (default "auto" with tools, else "none"):
- "none": the tools still go into the prompt (the template decides how); the output is content.
- "auto": the output is read for Llama 4 tool calls (serve/tool_parser.py) to declared functions.
- "required" and {"type": "function", "function": {"name": N}}: read the same way, restricted
  to the declared functions (to N). Without constrained decoding the model is NOT forced to
  call: an output with no valid call comes back as content with finish_reason "stop".
parallel_tool_calls=false keeps only the first call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request
from .tool_parser import ToolCallParser

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ChatOptions:
    tools: list[dict] | None = None
    tool_choice: str | dict = "none"
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def render_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ChatTokenizer.render."""
        return {"tools": self.tools, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "chat_template_kwargs": self.chat_template_kwargs}

    def tool_parser(self) -> ToolCallParser | None:
        """A parser for this request's output, or None when the output is plain content."""
        if not self.tools or self.tool_choice == "none":
            return None
        names = {t["function"]["name"] for t in self.tools}
        if isinstance(self.tool_choice, dict):
            names = {self.tool_choice["function"]["name"]}
        return ToolCallParser(allowed=names, max_calls=None if self.parallel_tool_calls else 1)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean", name)
    return v


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of function tools", "tools")
    seen = set()
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or \
                not isinstance(t.get("function"), dict):
            raise bad_request(f"{p} must be {{\"type\": \"function\", \"function\": {{...}}}}", p)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_request(f"{p}.function.name must be 1 to 64 letters, digits, '_' or '-'", f"{p}.function.name")
        if name in seen:
            raise bad_request(f"{p}.function.name: {name!r} is declared twice", f"{p}.function.name")
        seen.add(name)
        if "parameters" in f and not isinstance(f["parameters"], dict):
            raise bad_request(f"{p}.function.parameters must be a JSON Schema object", f"{p}.function.parameters")
        if "description" in f and not isinstance(f["description"], str):
            raise bad_request(f"{p}.function.description must be a string", f"{p}.function.description")
    return tools or None


def _tool_choice(body: dict, tools: list[dict] | None) -> str | dict:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto"):
        return choice
    if choice == "required":
        if not tools:
            raise bad_request("tool_choice 'required' needs 'tools'", "tool_choice")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        declared = {t["function"]["name"] for t in tools or []}
        if name not in declared:
            raise bad_request(f"tool_choice names the function {name!r}, which is not in 'tools'", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def parse_chat_options(body: dict) -> ChatOptions:
    tools = _tools(body)
    kwargs = body.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs  # not `or {}`: [] and "" are errors too
    if not isinstance(kwargs, dict):
        raise bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    opts = ChatOptions(tools=tools, tool_choice=_tool_choice(body, tools),
                       parallel_tool_calls=_bool(body, "parallel_tool_calls", True), chat_template_kwargs=kwargs,
                       add_generation_prompt=_bool(body, "add_generation_prompt", True),
                       continue_final_message=_bool(body, "continue_final_message", False))
    if opts.add_generation_prompt and opts.continue_final_message:
        raise bad_request("'add_generation_prompt' and 'continue_final_message' cannot both be true "
                          "(set add_generation_prompt to false to continue the last message)", "continue_final_message")
    return opts
