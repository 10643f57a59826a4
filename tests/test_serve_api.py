"""The OpenAI-compatible endpoint on a real Ray Serve deployment, called with the official client."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest
import requests

from serve_fixtures import start_serve, stop_serve

API_KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    common = {"model": str(tiny_ckpt), "served_model_name": "tiny", "max_model_len": 256,
              "default_max_tokens": 16, "max_request_bytes": 200_000}
    url = start_serve({"/": {**common, "ep_size": 2},
                       "/secured": {**common, "ep_size": 1, "api_key": API_KEY}}, num_cpus=5)
    yield url
    stop_serve()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three experts."}]


def test_chat_greedy_equals_cli_generate(client, tiny_ckpt):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES[1:], max_tokens=12, temperature=0)
    cli = subprocess.run([sys.executable, "-m", "maverick_ray.cli", "generate", "--model", str(tiny_ckpt),
                          "--prompt", MESSAGES[1]["content"], "--max-tokens", "12", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout.strip().splitlines()[-1])
    assert reply.choices[0].message.content == out["text"]
    assert reply.usage.completion_tokens == len(out["token_ids"])


def test_chat_usage_counts_prompt_tokens(client, tiny_ckpt):
    from maverick_ray.checkpoint.chat import Llama4Tokenizer

    tok = Llama4Tokenizer.from_pretrained(tiny_ckpt)
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
    r = requests.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3})
    assert r.status_code == 200, r.text
    return r


BAD = [
    ("invalid json", b"{not json", 400, None),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("messages wrong type", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("content wrong type", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("unknown model", {"model": "gpt-17", "messages": MESSAGES}, 404, "model"),
    ("max_tokens zero", {"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens beyond context", {"model": "tiny", "messages": MESSAGES, "max_tokens": 10_000}, 400, "max_tokens"),
    ("max_tokens wrong type", {"model": "tiny", "messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
    ("prompt longer than context", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
     400, "messages"),
    ("negative temperature", {"model": "tiny", "messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    ("n > 1", {"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "n"),
    ("over-large body", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, None),
]


@pytest.mark.parametrize("name,payload,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, name, payload, status, param):
    if isinstance(payload, bytes):
        r = requests.post(server + "/v1/chat/completions", data=payload, headers={"Content-Type": "application/json"})
    else:
        r = requests.post(server + "/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and len(err["message"]) > 10
    assert err["param"] == param
    good_request(server)


def test_client_sees_errors_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)


def test_disconnect_mid_stream_aborts_and_frees_cache(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
    with requests.post(server + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
        busy = requests.get(server + "/v1/engine/stats").json()
        assert busy["running"] == 1 and busy["kv_slots_used"] == 1
        aborted_before = busy["finished"].get("abort", 0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = requests.get(server + "/v1/engine/stats").json()
        if stats["running"] == 0 and stats["kv_slots_used"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["kv_slots_used"] == 0 and stats["kv_tokens_used"] == 0
    assert stats["finished"].get("abort", 0) == aborted_before + 1, "the sequence was not aborted"
    good_request(server)


def test_api_key_required_when_configured(server):
    url = server + "/secured/v1/chat/completions"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    r = requests.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert requests.get(server + "/secured/health").status_code == 200
    authed = openai.OpenAI(base_url=server + "/secured/v1", api_key=API_KEY, max_retries=0)
    assert authed.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_readme_python_example_runs_against_the_server(server):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    code = code.replace("http://127.0.0.1:8000", server)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


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


BAD_IMAGES = [
    ("invalid base64", "data:image/png;base64,@@@", "not valid base64"),
    ("non-image data URL", "data:text/plain;base64,aGVsbG8=", "not an image"),
    ("remote URL", "https://example.com/cat.png", "remote image URLs are disabled"),
    ("truncated png", "TRUNCATED", "truncated or corrupt"),
]


@pytest.mark.parametrize("name,url,msg", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_400(server, name, url, msg):
    import base64

    from image_helpers import image_bytes

    if url == "TRUNCATED":
        png = image_bytes(64, 64)
        url = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2}
    r = requests.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert msg in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"
    good_request(server)


def test_too_many_images_get_400(server):
    import base64

    from image_helpers import image_bytes

    url = "data:image/png;base64," + base64.b64encode(image_bytes(20, 20)).decode()
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}] * 9}], "max_tokens": 2}
    r = requests.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
    good_request(server)
