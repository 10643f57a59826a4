"""The demo model answers through the served API: the official openai client over the HTTP layer
(the Serve deployment's routes, no Ray) on a real EP=1 engine with the committed demo checkpoint.
An arithmetic question, and a picture sent as a data URL, asked its shape and its colour."""

from __future__ import annotations

import base64

import openai
import pytest
from fastapi.testclient import TestClient

from maverick_ray.demo_model import demo_checkpoint_dir
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService, image_prompt_builder
from maverick_ray.serve.settings import ServeSettings

DEMO = demo_checkpoint_dir()


@pytest.fixture(scope="module")
def client():
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.engine.engine import Engine

    settings = ServeSettings.from_args({"model": str(DEMO), "ep_size": 1, "max_model_len": 512,
                                        "default_max_tokens": 16})
    tok = ChatTokenizer.from_pretrained(DEMO)
    with Engine(DEMO, settings.parallel(), settings.engine(), use_ray=False, tokenizer=tok) as eng:
        service = OpenAIService(eng, tok, settings, "demo", image_prompt_builder(DEMO, eng, tok, settings))
        with TestClient(make_api(lambda: Backend(service))) as http:
            yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def ask(client, content) -> str:
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                         temperature=0, max_tokens=8)
    assert out.choices[0].finish_reason == "stop"
    return out.choices[0].message.content.strip()


def test_an_arithmetic_question_is_answered(client):
    assert ask(client, "What is 37+45?") == "82"
    assert ask(client, "What is 18+29?") == "47"


@pytest.mark.parametrize("kind", ["shape", "colour"])
def test_a_picture_question_is_answered(client, kind):
    """A held-out picture (not in training), asked its shape or its colour: the first such
    question of the eval's seed 7. The model card gives 99.5% for each on 200 new pictures."""
    from maverick_ray.train.evaluate import image_questions

    png, question, answer = next(q for q in image_questions(4, seed=7) if q[1].startswith(f"What {kind}"))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    got = ask(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}])
    assert got.lower() == answer.lower()
