"""The assistant's output as OpenAI chat messages and stream deltas, tool calls included.

With a tool parser (serve/chat_options.py: tools given and tool_choice not "none") the output is
read for tool calls (serve/tool_parser.py). A reply with calls has `tool_calls` (content null
unless text followed the calls) and finish_reason "tool_calls" when generation stopped by itself
("length" stays "length": the output was cut). Streams carry each call as OpenAI streams them:
a delta `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`,
then `{"tool_calls": [{"index", "function": {"arguments": "..."}}]}`.
"""

from __future__ import annotations

from .tool_parser import ToolCallParser, parse_tool_calls


def finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def chat_message(text: str, parser: ToolCallParser | None) -> tuple[dict, bool]:
    """(the reply's `message`, whether it has tool calls) for the whole output `text`."""
    if parser is None:
        return {"role": "assistant", "content": text}, False
    calls, content = parse_tool_calls(text, parser.allowed, parser.max_calls)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}, True


class StreamDeltas:
    """Text deltas of a stream -> chat `delta` objects (content or tool-call deltas)."""

    def __init__(self, parser: ToolCallParser | None):
        self.parser = parser
        self.called = False

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        return [] if self.parser is None else self._deltas(self.parser.finish())

    def _deltas(self, events: list[tuple]) -> list[dict]:
        out = []
        for e in events:
            if e[0] == "content":
                out.append({"content": e[1]})
                continue
            _, index, call = e
            self.called = True
            out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        return out
