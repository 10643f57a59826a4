"""The OpenAI-compatible endpoint on a real Ray Serve deployment (EP=1, API key on), called with the
official client: the tiny model's real output, the engine's own checks, the Serve proxy in the path.

Request parsing, every bad-request case, auth, body limits, streaming chunk shapes and the error
paths are tested in milliseconds over an in-process fake engine in test_http_completions.py and
test_http_errors.py.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from serve_fixtures import start_serve, stop_serve

API_KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


TOOL_REPLY = "[get_weather(city='sf')]"   # what the /tools app's checkpoint answers to any chat prompt
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    from biased_checkpoint import write_biased_checkpoint

    # EP = 1: the replica's in-process rank. Serve with EP > 1 replicas runs in test_metrics,
    # test_serve_deploy and test_serve_autoscale; here the API is what is under test.
    tiny = {"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1, "max_model_len": 256,
            "default_max_tokens": 16}
    biased = write_biased_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("biased") / "ckpt", TOOL_REPLY)
    # /limits: a replica that takes one request at a time, behind a proxy queue of one.
    # /tools: a checkpoint whose greedy reply to any chat prompt is TOOL_REPLY (tests/biased_checkpoint.py).
    url = start_serve({"/": {**tiny, "api_key": API_KEY},
                       "/limits": {**tiny, "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 7},
                       "/tools": {**tiny, "model": str(biased), "served_model_name": "tools", "max_model_len": 1024}},
                      num_cpus=6)  # Ray prestarts a worker per CPU, which Serve's actors reuse
    yield url
    stop_serve()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three experts."}]


def test_chat_greedy_equals_cli_generate(client, tiny_ckpt, capsys):
    from maverick_ray.cli import main

    reply = client.chat.completions.create(model="tiny", messages=MESSAGES[1:], max_tokens=12, temperature=0)
    # the CLI's own entry point, in this process (EP=1, no Ray): a subprocess would add only the interpreter start and imports
    rc = main(["generate", "--model", str(tiny_ckpt), "--prompt", MESSAGES[1]["content"], "--max-tokens", "12",
               "--json"])
    cli = capsys.readouterr()
    assert rc == 0, cli.err
    out = json.loads(cli.out.strip().splitlines()[-1])
    assert reply.choices[0].message.content == out["text"]
    assert reply.usage.completion_tokens == len(out["token_ids"])


def test_chat_usage_counts_prompt_tokens(client, tiny_ckpt):
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_pretrained(tiny_ckpt)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens == len(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.model == "tiny"


def test_streaming_matches_non_streaming_and_reports_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_seed_reproduces_sampling(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content
    a, b = sample(7), sample(7)
    assert a == b
    others = {sample(s) for s in (8, 9, 10)}
    assert others != {a}, "different seeds should not all give the same sample"


def test_stop_string_cuts_the_output(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_and_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    comp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens == 6
    assert requests.get(server + "/health").json() == {"status": "ok"}


def good_request(server):
    r = requests.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3},
                      headers=AUTH)
    assert r.status_code == 200, r.text
    return r


BEYOND_CONTEXT = [  # checked by the engine itself (its context length), not by the HTTP layer
    ("max_tokens beyond context", {"model": "tiny", "messages": MESSAGES, "max_tokens": 10_000}, "max_tokens"),
    ("prompt longer than context", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
     "messages"),
]


@pytest.mark.parametrize("name,payload,param", BEYOND_CONTEXT, ids=[b[0] for b in BEYOND_CONTEXT])
def test_input_beyond_the_context_gets_400_and_server_keeps_serving(server, name, payload, param):
    r = requests.post(server + "/v1/chat/completions", json=payload, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "context" in err["message"] and err["param"] == param
    good_request(server)


def test_disconnect_mid_stream_aborts_and_frees_cache(server):
    # /tools (max_model_len 1024): 900 tokens, so the stream cannot end on its own before the
    # disconnect reaches the engine (200 tokens of the tiny model could, on a fast host)
    body = {"model": "tools", "messages": MESSAGES, "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with requests.post(server + "/tools/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
        busy = requests.get(server + "/tools/v1/engine/stats").json()
        assert busy["running"] == 1 and busy["kv_pages_used"] > 0
        aborted_before = busy["finished"].get("abort", 0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = requests.get(server + "/tools/v1/engine/stats").json()
        if stats["running"] == 0 and stats["kv_pages_used"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["kv_pages_used"] == 0 and stats["kv_tokens_used"] == 0
    assert stats["finished"].get("abort", 0) == aborted_before + 1, "the sequence was not aborted"
    good_request(server)


def test_deadline_and_request_id_through_the_serve_proxy(server):
    headers = {**AUTH, "X-Request-Id": "serve-deadline-1"}
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 50, "temperature": 0, "timeout": 0.001}
    r = requests.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 504, r.text
    assert r.headers["x-request-id"] == "serve-deadline-1"  # echoed once, by Serve's proxy
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["message"].startswith("the request passed its deadline of 0.001 s")
    assert err["message"].endswith("(request id serve-deadline-1)")
    stats = requests.get(server + "/v1/engine/stats", headers=AUTH).json()
    assert stats["finished"].get("timeout", 0) >= 1 and stats["kv_pages_used"] == 0
    made = good_request(server).headers["x-request-id"]
    assert made and "," not in made  # Serve made one id and it was not sent twice


def test_full_serve_queue_gets_503_with_retry_after(server):
    """A request whose body is still arriving holds /limits' one replica slot, the next waits in the
    proxy's queue of one, and those after it get Serve's 503 with Retry-After until the slot frees."""
    url = server + "/limits/v1/chat/completions"
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode()
    held = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=60)
    with held, ThreadPoolExecutor(4) as pool:
        held.sendall(b"POST /limits/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(1.0)  # the replica is reading the rest of the body
        later = []
        for _ in range(4):
            later.append(pool.submit(requests.post, url, json=json.loads(body), timeout=60))
            time.sleep(0.3)
        refused = [f.result() for f in later if f.done()]
        assert len(refused) >= 2 and all(r.status_code == 503 for r in refused), [r.text for r in refused]
        assert all(r.headers["retry-after"] == "7" for r in refused)
        held.sendall(body[5:])
        assert held.recv(4096).startswith(b"HTTP/1.1 200"), "the held request did not complete"
        statuses = sorted(f.result().status_code for f in later)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses  # the queued one was served


def test_every_route_is_served_by_the_replica(server):
    stats = requests.get(server + "/v1/engine/stats", headers=AUTH).json()
    assert stats["healthy"] and stats["ep_size"] == 1 and len(stats["ranks"]) == 1
    load = requests.get(server + "/v1/expert-load", headers=AUTH)
    assert load.status_code == 200 and isinstance(load.json(), dict)
    dash = requests.get(server + "/dashboard")  # a static page: it asks for the key itself
    assert dash.status_code == 200 and dash.headers["content-type"].startswith("text/html")
    assert requests.post(server + "/v1/debug/force-expert", json={"expert": 1}, headers=AUTH).status_code == 404


def test_api_key_required_on_the_real_server(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    r = requests.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(server + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert requests.get(server + "/v1/models").status_code == 401
    for path in ("/v1/engine/stats", "/v1/expert-load", "/docs"):
        r = requests.get(server + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        assert requests.post(server + path, json=body).status_code == 401, path
    assert requests.get(server + "/health").status_code == 200  # probes need no key


def test_strict_fields_and_bad_values_through_serve(server, client):
    """Unknown fields and bad values get OpenAI-shaped 4xx through the Serve proxy; CORS is off;
    the replica keeps serving (test_request_strictness.py has the long list)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body={"best_of": 2})
    assert e.value.code == "unknown_parameter" and e.value.param == "best_of"
    url = server + "/v1/chat/completions"
    for extra, status, param in [({"temperature": "hot"}, 400, "temperature"), ({"max_tokens": 10**9}, 400, "max_tokens"),
                                 ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
                                 ({"timeout": -1}, 400, "timeout"), ({"messages": []}, 400, "messages"),
                                 ({"model": "gpt-17"}, 404, "model")]:
        r = requests.post(url, json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **extra}, headers=AUTH)
        assert r.status_code == status, (extra, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["param"] == param
    pre = requests.options(url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, user="u1")
    assert reply.usage.completion_tokens >= 1


def test_readme_python_example_runs_against_the_server(server, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "http://127.0.0.1:8000" in code and 'api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8000", server).replace('api_key="unused"', f'api_key="{API_KEY}"')
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()


def test_image_prompt_with_data_url(client, server):
    import base64

    from image_helpers import image_bytes

    url = "data:image/png;base64," + base64.b64encode(image_bytes(110, 50)).decode()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=msgs[:0] + [{"role": "user", "content": "What is this?"}],
                                       max_tokens=6, temperature=0)
    assert a.usage.prompt_tokens > b.usage.prompt_tokens + 12  # 3 tiles x 4 patches + markers
    assert a.choices[0].finish_reason in ("length", "stop")
    # a bad image's 400 comes back across the engine's preprocessing thread
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        client.chat.completions.create(model="tiny", messages=bad, max_tokens=2)


def test_tool_calls_from_the_real_engine_streaming_and_not(server):
    client = openai.OpenAI(base_url=server + "/tools/v1", api_key="unused", max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "What is the weather in San Francisco?"}]
    r = client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "sf"})
    chunks = list(client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER], temperature=0,
                                                 max_tokens=40, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas if d.id] == [(0, "get_weather")]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "sf"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    plain = client.chat.completions.create(model="tools", messages=ask, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=40)
    assert plain.choices[0].message.content == TOOL_REPLY and plain.choices[0].finish_reason == "stop"


def test_tokenize_through_serve_equals_transformers_and_request_id_names_the_reply(server, tiny_ckpt):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "cold"}]
    r = requests.post(server + "/tokenize", json={"model": "tiny", "messages": msgs, "tools": [WEATHER]},
                      headers={**AUTH, "X-Request-Id": "tok-serve-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "tok-serve-1"
    hf_msgs = [dict(m) for m in msgs]
    hf_msgs[2] = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    ref = AutoTokenizer.from_pretrained(tiny_ckpt).apply_chat_template(hf_msgs, tools=[WEATHER],
                                                                       add_generation_prompt=True)
    assert r.json()["tokens"] == list(ref["input_ids"])
    assert requests.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401  # the key is required
    chat = requests.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 2},
                         headers={**AUTH, "X-Request-Id": "named-by-client"})
    assert chat.status_code == 200 and chat.json()["id"] == "chatcmpl-named-by-client"
    # what /tokenize reports is what the engine ran (without tools: the prompt fits this app's context)
    plain = requests.post(server + "/tokenize", json={"messages": msgs}, headers=AUTH).json()
    assert chat.json()["usage"]["prompt_tokens"] == plain["count"] < r.json()["count"]
