"""Expert load by token class on the trained demo model, as served: a mixed workload (prose, code,
arithmetic, pictures) through the openai client, then `GET /v1/expert-load`'s `by_token_class`
(engine/token_classes.py) and the live page's specialization view in headless Chromium."""

from __future__ import annotations

import base64
import json
import urllib.request

import openai
import pytest

from maverick_ray.demo_model import demo_checkpoint_dir
from maverick_ray.engine.token_classes import TOKEN_CLASSES, token_class_table
from maverick_ray.train.data_images import png_bytes, render, single_scene
from page_helpers import dashboard_screenshot
from serve_fixtures import app_on_loopback

DEMO = demo_checkpoint_dir()
PROMPTS = ["The module defines the following functions:", "def read_file(path):\n    with open(path) as f:\n",
           "import os\nimport sys\n\n\nclass Config:\n", "This is useful when the value is not known in advance."]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def test_the_class_of_each_token_comes_from_the_tokenizer():
    from tokenizers import Tokenizer

    from maverick_ray.config import ModelConfig

    cfg = ModelConfig.from_pretrained(DEMO)
    table = token_class_table(DEMO, cfg.text.vocab_size, cfg.image_token_id)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    cls = lambda piece: TOKEN_CLASSES[int(table[tok.token_to_id(piece)])]  # noqa: E731
    assert cls("7") == "digits" and cls("(") == "punctuation"
    assert cls("<|header_start|>") == "special" and cls("<|eot|>") == "special"
    assert cls("<|patch|>") == "image patches" and TOKEN_CLASSES[int(table[cfg.image_token_id])] == "image patches"
    words = [i for i in range(tok.get_vocab_size()) if any(c.isalpha() for c in tok.decode([i]))
             and i not in {t for t, a in tok.get_added_tokens_decoder().items() if a.special}]
    assert words and all(TOKEN_CLASSES[int(table[i])] == "words" for i in words)


@pytest.fixture(scope="module")
def served():
    """The demo server on loopback after a mixed workload: prose and code completions, sums,
    pictures; yields (url, engine)."""
    import random

    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.engine.engine import Engine
    from maverick_ray.metrics import EngineMetrics
    from maverick_ray.serve.http_api import Backend, make_api
    from maverick_ray.serve.openai_service import OpenAIService, image_prompt_builder
    from maverick_ray.serve.settings import ServeSettings

    settings = ServeSettings.from_args({"model": str(DEMO), "served_model_name": "demo", "ep_size": 1,
                                        "max_model_len": 512, "default_max_tokens": 16})
    tok = ChatTokenizer.from_pretrained(DEMO)
    with Engine(DEMO, settings.parallel(), settings.engine(), use_ray=False, tokenizer=tok) as eng:
        service = OpenAIService(eng, tok, settings, "demo", image_prompt_builder(DEMO, eng, tok, settings))
        backend = Backend(service, EngineMetrics(eng, "demo-test", window_steps=10_000))
        with app_on_loopback(make_api(lambda: backend)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            rng = random.Random(7)
            for prompt in PROMPTS:
                client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0)
            for a, b in ((12, 34), (56, 27), (71, 18), (45, 45)):
                client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"What is {a}+{b}?"}],
                                               max_tokens=8, temperature=0)
            for _ in range(4):
                url_png = "data:image/png;base64," + base64.b64encode(png_bytes(render(single_scene(rng), 64))).decode()
                client.chat.completions.create(model="demo", max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url_png}}, {"type": "text", "text": "What colour is the shape?"}]}])
            yield url, eng


def test_expert_load_on_a_mixed_workload_shows_experts_specialised_by_token_class(served):
    url, eng = served
    body = get_json(url + "/v1/expert-load")
    b = body["by_token_class"]
    assert b["classes"] == list(TOKEN_CLASSES) and b["moe_layers"] == body["moe_layers"]
    per_layer = [sum(map(sum, layer)) for layer in b["tokens"]]
    # every token passes every MoE layer once, and the per-class counts add up to the window's load
    assert len(set(per_layer)) == 1 and per_layer[0] > 0
    assert per_layer == [sum(row) for row in body["expert_load"]]
    image = [sum(layer[TOKEN_CLASSES.index("image patches")]) for layer in b["tokens"]]
    tile = eng.model_config.vision.tokens_per_tile
    assert image[0] == 4 * tile and len(set(image)) == 1        # four one-tile pictures, no prefix hit
    for k in ("words", "digits", "punctuation", "special"):
        assert sum(b["tokens"][0][TOKEN_CLASSES.index(k)]) > 0, k
    # a trained router is not uniform: experts that take a class at 3x its share, in every layer
    found = [len(layer) for layer in b["specialised"]]
    assert all(n >= 1 for n in found), b["specialised"]
    for layer, spec in zip(b["ratio"], b["specialised"]):
        for s in spec:
            assert layer[TOKEN_CLASSES.index(s["class"])][s["expert"]] >= b["threshold"]
    # ... and the plain per-expert load shows the skew too: the busiest expert well above the mean
    for row in body["expert_load"]:
        assert max(row) >= 1.5 * (sum(row) / len(row)), row


def test_the_live_page_draws_the_specialization_view(served, tmp_path):
    url, _ = served
    expected = sum(len(layer) for layer in get_json(url + "/v1/expert-load")["by_token_class"]["specialised"])
    shot = dashboard_screenshot(url, tmp_path, "specialization", height=1100)
    assert int(shot["data"]["specialised-experts"]) == expected > 0
    assert int(shot["data"]["specialization-cells"]) > 0
    assert 'class="specialised"' in shot["dom"] and "image patches" in shot["dom"]
