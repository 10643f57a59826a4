"""Images in chat requests through the HTTP layer, over the in-process fake engine (no model, no
Ray): an image prompt preprocessed off the event loop and reaching the engine, and the 400s for bad
images, too many images and images sent to a text-only model.
"""

from __future__ import annotations

import base64

import pytest

import http_helpers
from http_helpers import assert_openai_error, chat

make_client, http = http_helpers.make_client, http_helpers.http  # the HTTP app fixtures; tokenizer, fake: conftest


def image_message(*urls: str, text: str | None = None) -> list[dict]:
    parts = ([{"type": "text", "text": text}] if text else []) + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def png_url(width: int, height: int, truncate: bool = False) -> str:
    from image_helpers import image_bytes

    png = image_bytes(width, height)
    return "data:image/png;base64," + base64.b64encode(png[: len(png) // 2] if truncate else png).decode()


def test_image_prompt_is_preprocessed_off_the_loop_and_reaches_the_engine(http, fake):
    a = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                "messages": image_message(png_url(110, 50), text="What is this?")})
    assert a.status_code == 200, a.text
    b = chat(http, max_tokens=2, messages=[{"role": "user", "content": "What is this?"}])
    assert b.status_code == 200, b.text
    with_image, text_only = list(fake.requests.values())
    assert fake.preprocessed == 1 and with_image.mm_inputs is not None and text_only.mm_inputs is None
    assert len(with_image.prompt_ids) > len(text_only.prompt_ids) + 12  # 3 tiles x 4 patches + markers
    assert a.json()["usage"]["prompt_tokens"] == len(with_image.prompt_ids)


BAD_IMAGES = [
    ("invalid base64", "data:image/png;base64,@@@", "not valid base64"),
    ("non-image data URL", "data:text/plain;base64,aGVsbG8=", "not an image"),
    ("remote URL", "https://example.com/cat.png", "remote image URLs are disabled"),
    ("truncated png", "TRUNCATED", "truncated or corrupt"),
]


@pytest.mark.parametrize("name,url,msg", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_get_400(http, fake, name, url, msg):
    if url == "TRUNCATED":
        url = png_url(64, 64, truncate=True)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(url), "max_tokens": 2})
    err = assert_openai_error(r, 400, "messages", "invalid_image")
    assert msg in err["message"]
    assert fake.requests == {}


def test_too_many_images_get_400(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(*[png_url(20, 20)] * 9),
                                                "max_tokens": 2})
    assert "at most 8" in assert_openai_error(r, 400, "messages")["message"]


def test_images_on_a_text_only_model_get_400(make_client, fake):
    http = make_client(images=False)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(png_url(20, 20))})
    assert_openai_error(r, 400, "messages", "images_not_supported")
    assert fake.preprocessed == 0
