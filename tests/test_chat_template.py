"""Chat prompts are the checkpoint's chat template rendered exactly as transformers renders it.

Prompt parity: for each conversation the ids the server runs (seen through POST /tokenize, and
checked to be what /v1/chat/completions hands the engine) equal transformers'
`apply_chat_template` on the same checkpoint; with images, transformers' Llama4Processor (in the
oracle venv) on transformers' rendering. The client sends OpenAI messages (image_url parts,
tool-call arguments as JSON strings); transformers gets the same conversation in Hugging Face's
form (image parts, arguments as objects). Also: where the template comes from (override,
tokenizer_config.json, chat_template.jinja, chat_template.json, none) and the template's own
Llama 4 format. The HTTP layer runs over the fake engine (tests/fake_engine.py).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from cli_helpers import run_cli_here
from fake_engine import FakeEngine
from image_helpers import image_bytes
from maverick_ray.checkpoint.chat_template import ChatTemplateError
from maverick_ray.checkpoint.tokenizer import ChatTokenizer
from maverick_ray.config import ConfigError
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService, image_prompt_builder
from maverick_ray.serve.settings import ServeSettings

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
HF_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": {"city": "Paris", "days": 2}}}


def turn(role, content, **kw):
    return {"role": role, "content": content, **kw}


# (name, OpenAI messages as sent, the same in Hugging Face's form or None when identical, request fields)
CASES = [
    ("system_with_whitespace", [turn("system", "  \n You are terse.\n\n "), turn("user", "Name three experts.")], None, {}),
    ("multi_turn", [turn("user", "hi"), turn("assistant", "Hello, how are you?"),
                    turn("user", [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}])], None, {}),
    ("tools_in_first_user_message", [turn("system", "Be brief."), turn("user", "Weather in Paris?")], None,
     {"tools": [WEATHER, TIME]}),
    ("tools_in_system_message", [turn("user", "Weather in Paris?")], None,
     {"tools": [WEATHER], "chat_template_kwargs": {"tools_in_user_message": False}}),
    ("assistant_tool_calls_and_results",
     [turn("user", "Weather in Paris?"), turn("assistant", None, tool_calls=[CALL]),
      turn("tool", "18 C, sunny", tool_call_id="call_1"), turn("ipython", [{"type": "text", "text": "{\"uv\": 3}"}]),
      turn("user", "And tomorrow?")],
     [turn("user", "Weather in Paris?"), turn("assistant", "", tool_calls=[HF_CALL]),
      turn("tool", "18 C, sunny", tool_call_id="call_1"), turn("ipython", [{"type": "text", "text": "{\"uv\": 3}"}]),
      turn("user", "And tomorrow?")],
     {"tools": [WEATHER]}),
    ("no_generation_prompt", [turn("user", "hi"), turn("assistant", "Hello!")], None, {"add_generation_prompt": False}),
    ("continue_final_message", [turn("user", "Count to three."), turn("assistant", "One, two,")], None,
     {"add_generation_prompt": False, "continue_final_message": True}),
]


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


def make_http(ckpt, tokenizer):
    fake = FakeEngine(ckpt, tokenizer)
    settings = ServeSettings.from_args({"model": str(ckpt), "served_model_name": "tiny", "ep_size": 1,
                                        "max_model_len": 4096, "default_max_tokens": 4})
    fake.max_model_len = settings.engine().max_model_len  # as an engine resolves an explicit one
    service = OpenAIService(fake, tokenizer, settings, "tiny", image_prompt_builder(ckpt, fake, tokenizer, settings))
    return TestClient(make_api(lambda: Backend(service))), fake


@pytest.fixture(scope="module")
def served(tiny_ckpt, tokenizer):
    http, fake = make_http(tiny_ckpt, tokenizer)
    yield http, fake
    http.close()
    fake.close()


def hf_ids(hf, messages, fields) -> list[int]:
    kw = dict(fields.get("chat_template_kwargs", {}))
    out = hf.apply_chat_template(messages, tools=fields.get("tools"), tokenize=True,
                                 add_generation_prompt=fields.get("add_generation_prompt", True),
                                 continue_final_message=fields.get("continue_final_message", False), **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name,messages,hf_messages,fields", CASES, ids=[c[0] for c in CASES])
def test_tokenize_equals_transformers_and_is_what_the_engine_runs(served, hf, name, messages, hf_messages, fields):
    http, fake = served
    r = http.post("/tokenize", json={"model": "tiny", "messages": messages, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == hf_ids(hf, hf_messages or messages, fields)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 4096 and body["token_strs"] is None
    chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1, **fields})
    assert chat.status_code == 200, chat.text
    assert list(fake.requests.values())[-1].prompt_ids == body["tokens"]


def test_the_template_writes_the_documented_llama4_format(tokenizer):
    case = {c[0]: c for c in CASES}
    _, msgs, _, fields = case["assistant_tool_calls_and_results"]
    text = tokenizer.render(msgs, tools=fields["tools"])
    assert text.startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\nWeather in Paris?\n"
                           "Here is a list of functions in JSON format that you can invoke:\n[\n    {\n"
                           "        \"name\": \"get_weather\",")
    assert ("<|header_start|>assistant<|header_end|>\n\n[get_weather(city=\"Paris\", days=2)]<|eot|>"
            "<|header_start|>ipython<|header_end|>\n\n18 C, sunny<|eot|>"
            "<|header_start|>ipython<|header_end|>\n\n{\"uv\": 3}<|eot|>") in text
    assert text.endswith("<|header_start|>user<|header_end|>\n\nAnd tomorrow?<|eot|>"
                         "<|header_start|>assistant<|header_end|>\n\n")
    _, msgs, _, _ = case["system_with_whitespace"]
    assert tokenizer.render(msgs).startswith("<|begin_of_text|><|header_start|>system<|header_end|>\n\n"
                                             "You are terse.<|eot|>")
    with pytest.raises(ChatTemplateError, match="first user message"):
        tokenizer.render([turn("system", "x")], tools=[WEATHER])


def test_tokenize_prompt_detokenize_and_token_strs(served, tokenizer):
    http, _ = served
    r = http.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True},
                  headers={"X-Request-Id": "tok-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "tok-1"
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello there", add_bos=True)  # what /v1/completions runs
    assert body["token_strs"][0] == "<|begin_of_text|>" and len(body["token_strs"]) == body["count"]
    plain = http.post("/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:]
    back = http.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert back.json() == {"prompt": "<|begin_of_text|>Hello there"}
    for bad, param in [({"tokens": [1, "x"]}, "tokens"), ({"tokens": [10**9]}, "tokens"), ({}, "tokens")]:
        r = http.post("/detokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = http.post("/tokenize", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404
    r = http.post("/tokenize", json={"messages": [turn("user", "x")], "add_generation_prompt": True,
                                     "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    r = http.post("/tokenize", json={"messages": [turn("user", "x")], "chat_template_kwargs": {"tools": []}})
    assert r.status_code == 400 and "chat_template_kwargs may not set tools" in r.json()["error"]["message"]


def oracle_ids(tmp_path, ckpt, hf, hf_messages, images: list[bytes]) -> list[int]:
    from test_image_processor_parity import oracle

    paths = []
    for i, data in enumerate(images):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(data)
        paths.append(p)
    prompt = hf.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    return oracle(tmp_path, ckpt, paths, prompt=prompt)["input_ids"]


def test_images_in_either_order_equal_llama4processor(served, hf, tiny_ckpt, tmp_path):
    http, fake = served
    imgs = [image_bytes(110, 50, seed=1), image_bytes(40, 40, seed=2), image_bytes(60, 130, seed=3)]
    url = ["data:image/png;base64," + base64.b64encode(b).decode() for b in imgs]
    part = [{"type": "image_url", "image_url": {"url": u}} for u in url]
    messages = [turn("system", " Look closely. "),
                turn("user", [part[0], {"type": "text", "text": "What is this?"}]),
                turn("assistant", "A gradient."),
                turn("user", [{"type": "text", "text": "And these two?"}, part[1], part[2]])]
    hf_messages = [turn("system", " Look closely. "),
                   turn("user", [{"type": "image"}, {"type": "text", "text": "What is this?"}]),
                   turn("assistant", "A gradient."),
                   turn("user", [{"type": "text", "text": "And these two?"}, {"type": "image"}, {"type": "image"}])]
    r = http.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == oracle_ids(tmp_path, tiny_ckpt, hf, hf_messages, imgs)
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert chat.status_code == 200 and list(fake.requests.values())[-1].prompt_ids == r.json()["tokens"]


# ---- where the template comes from ---------------------------------------------------------------
SIMPLE = "{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>{{ m['content'] }}{% endfor %}"


def without_template(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json"])
def test_template_files_of_the_checkpoint(tmp_path, tiny_ckpt, where):
    from transformers import AutoTokenizer

    ck = without_template(tiny_ckpt, tmp_path / "c")
    if where == "chat_template.jinja":
        (ck / where).write_text(SIMPLE)
    else:
        (ck / where).write_text(json.dumps({"chat_template": SIMPLE}))
    tok = ChatTokenizer.from_pretrained(ck)
    msgs = [turn("user", "hi")]
    ref = AutoTokenizer.from_pretrained(ck).apply_chat_template(msgs, chat_template=SIMPLE, tokenize=False,
                                                               add_generation_prompt=True)
    assert tok.render(msgs) == ref == "<|header_start|>user<|header_end|>hi"


def test_override_and_a_checkpoint_without_template(tmp_path, tiny_ckpt, hf):
    ck = without_template(tiny_ckpt, tmp_path / "c")
    bare = ChatTokenizer.from_pretrained(ck)
    assert not bare.has_chat_template
    http, _ = make_http(ck, bare)
    with http:
        r = http.post("/v1/chat/completions", json={"messages": [turn("user", "hi")]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "--chat-template" in r.json()["error"]["message"]
        assert http.post("/tokenize", json={"messages": [turn("user", "hi")]}).status_code == 400
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    f = tmp_path / "simple.jinja"
    f.write_text(SIMPLE)
    over = ChatTokenizer.from_pretrained(tiny_ckpt, chat_template=str(f))  # wins over the checkpoint's own
    assert over.render([turn("user", "hi")]) == "<|header_start|>user<|header_end|>hi"
    assert ChatTokenizer.from_pretrained(ck, chat_template=SIMPLE).render([turn("user", "a")]).endswith("a")
    with pytest.raises(ConfigError, match="no-such.jinja is not a file"):
        ChatTokenizer.from_pretrained(ck, chat_template=str(tmp_path / "no-such.jinja"))
    f.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTokenizer.from_pretrained(ck, chat_template=str(f))


def test_generate_cli_takes_chat_template_and_fails_clearly_without_one(tmp_path, tiny_ckpt):
    ck = without_template(tiny_ckpt, tmp_path / "c")
    base = [sys.executable, "-m", "maverick_ray.cli", "generate", "--model", str(ck), "--prompt", "hi",
            "--max-tokens", "2", "--json"]
    r = run_cli_here(*base[3:])  # the refusal, in this process (tests/cli_helpers.py): no model loads
    assert r.returncode == 2 and "has no chat template" in r.stderr and "Traceback" not in r.stderr
    f = tmp_path / "t.jinja"
    f.write_text(json.loads((tiny_ckpt / "tokenizer_config.json").read_text())["chat_template"])
    r = subprocess.run(base + ["--chat-template", str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) <= 2
