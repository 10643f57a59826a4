"""bench_soak's load: the request mix and the client threads that send it (official `openai` client
and `requests`), each request checked for the answer it must get."""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import threading
import time
from collections import Counter, defaultdict

MODEL = "tiny"

# One cycle of the mix; request n (over all clients) is MIX[n % len(MIX)] after a fixed shuffle,
# so every run sends the same proportions.
MIX_WEIGHTS = {"chat": 4, "chat_stream": 4, "completion": 2, "completion_stream": 2, "image": 2,
               "abort": 2, "bad_max_tokens": 1, "bad_role": 1}
BAD_KINDS = ("bad_max_tokens", "bad_role")
PROMPTS = ["Name three experts.", "Tell me a story about a router.", "What is expert parallelism?",
           "Summarise the plot of a film in one line.", "List some colours.", "Why is the sky blue?"]
SYSTEM = {"role": "system", "content": "You are terse."}
ABORT_AFTER_CHUNKS = 3


# ---- request kinds: each raises on anything but the expected answer -------------------------

def png_data_url(width: int, height: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    rng.integers(0, 256, (height, width))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Client:
    """One client thread's connections: an `openai.OpenAI` and a `requests.Session`."""

    def __init__(self, url: str, timeout: float, images: list[str], rng: random.Random):
        import openai
        import requests

        self.url, self.timeout, self.images, self.rng = url, timeout, images, rng
        self.oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        self.session = requests.Session()

    def close(self) -> None:
        self.oa.close()
        self.session.close()

    def _sampling(self) -> dict:
        r = self.rng
        kw = {"max_tokens": r.randint(4, 24), "temperature": r.choice([0.0, 0.7, 1.0])}
        if kw["temperature"] and r.random() < 0.5:
            kw["seed"] = r.randint(0, 1 << 30)
        return kw

    def _messages(self) -> list[dict]:
        user = {"role": "user", "content": self.rng.choice(PROMPTS)}
        return [SYSTEM, user] if self.rng.random() < 0.5 else [user]

    @staticmethod
    def _check_usage(usage, max_tokens: int, finish: str | None) -> None:
        if finish not in ("stop", "length"):
            raise AssertionError(f"finish_reason {finish!r}")
        if usage is None:
            raise AssertionError("no usage")
        if not 0 <= usage.completion_tokens <= max_tokens:
            raise AssertionError(f"completion_tokens {usage.completion_tokens} with max_tokens {max_tokens}")
        if finish == "length" and usage.completion_tokens != max_tokens:
            raise AssertionError(f"finish 'length' after {usage.completion_tokens} of {max_tokens} tokens")

    def chat(self) -> None:
        kw = self._sampling()
        r = self.oa.chat.completions.create(model=MODEL, messages=self._messages(), **kw)
        self._check_usage(r.usage, kw["max_tokens"], r.choices[0].finish_reason)

    def chat_stream(self) -> None:
        kw = self._sampling()
        finish, usage = None, None
        for c in self.oa.chat.completions.create(model=MODEL, messages=self._messages(), stream=True,
                                                 stream_options={"include_usage": True}, **kw):
            if c.choices and c.choices[0].finish_reason:
                finish = c.choices[0].finish_reason
            if c.usage:
                usage = c.usage
        self._check_usage(usage, kw["max_tokens"], finish)

    def completion(self) -> None:
        kw = self._sampling()
        r = self.oa.completions.create(model=MODEL, prompt=self.rng.choice(PROMPTS), **kw)
        self._check_usage(r.usage, kw["max_tokens"], r.choices[0].finish_reason)

    def completion_stream(self) -> None:
        """Streamed completion over plain `requests`, parsing the SSE lines."""
        kw = self._sampling()
        body = {"model": MODEL, "prompt": self.rng.choice(PROMPTS), "stream": True,
                "stream_options": {"include_usage": True}, **kw}
        finish, usage, done = None, None, False
        with self.session.post(self.url + "/v1/completions", json=body, stream=True, timeout=self.timeout) as r:
            if r.status_code != 200:
                raise AssertionError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise AssertionError(f"error event: {chunk['error']}")
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if not done:
            raise AssertionError("stream ended without [DONE]")
        self._check_usage(argparse.Namespace(**usage) if usage else None, kw["max_tokens"], finish)

    def image(self) -> None:
        kw = self._sampling()
        content = [{"type": "text", "text": "What is in this picture?"},
                   {"type": "image_url", "image_url": {"url": self.rng.choice(self.images)}}]
        r = self.oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)
        self._check_usage(r.usage, kw["max_tokens"], r.choices[0].finish_reason)
        if r.usage.prompt_tokens < 20:
            raise AssertionError(f"image prompt of only {r.usage.prompt_tokens} tokens")

    def abort(self) -> None:
        """A long stream the client closes after a few chunks; the engine must free the sequence."""
        stream = self.oa.chat.completions.create(model=MODEL, messages=self._messages(), max_tokens=200,
                                                 temperature=0.8, stream=True)
        try:
            for n, _ in enumerate(stream, 1):
                if n >= ABORT_AFTER_CHUNKS:
                    break
        finally:
            stream.close()

    def _expect_400(self, body: dict, param: str) -> None:
        r = self.session.post(self.url + "/v1/chat/completions", json=body, timeout=self.timeout)
        if r.status_code != 400:
            raise AssertionError(f"expected 400, got HTTP {r.status_code}: {r.text[:200]}")
        err = r.json().get("error", {})
        if param not in (err.get("param") or ""):
            raise AssertionError(f"400 names param {err.get('param')!r}, expected {param!r}")

    def bad_max_tokens(self) -> None:
        self._expect_400({"model": MODEL, "messages": self._messages(), "max_tokens": 0}, "max_tokens")

    def bad_role(self) -> None:
        self._expect_400({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4},
                         "messages[0].role")


# ---- shared state --------------------------------------------------------------------------

class Load:
    """What the client threads share: tickets (the request bound), results, the stop flag."""

    def __init__(self, max_requests: int, seed: int):
        mix = [k for k, w in MIX_WEIGHTS.items() for _ in range(w)]
        random.Random(seed).shuffle(mix)
        self.mix = mix
        self.max_requests = max_requests
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.issued = 0
        self.done = 0
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[tuple[float, str, str]] = []  # (time, kind, reason)
        self.error_count: Counter = Counter()
        self.cut_off = 0  # requests that failed because an interrupted run was shutting down
        self.interrupted = False
        self.t0: float | None = None  # when the load started
        self.t_end: float | None = None  # when it ended

    def ticket(self) -> str | None:
        with self.lock:
            if self.stop.is_set() or self.issued >= self.max_requests:
                return None
            kind = self.mix[self.issued % len(self.mix)]
            self.issued += 1
            return kind

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.done += 1
            if error is None:
                self.latency[kind].append(seconds)
            elif self.interrupted:
                self.cut_off += 1
                return
            else:
                self.error_count[kind] += 1
                self.errors.append((time.monotonic(), kind, error))
        if error is not None:
            print(f"  ERROR {kind}: {error}", flush=True)


def client_thread(idx: int, load: Load, url: str, timeout: float, images: list[str], seed: int) -> None:
    client = Client(url, timeout, images, random.Random(seed * 1009 + idx))
    try:
        while (kind := load.ticket()) is not None:
            t0 = time.perf_counter()
            try:
                getattr(client, kind)()
                error = None
            except Exception as e:  # every failure is counted with its reason
                error = f"{type(e).__name__}: {str(e)[:300]}"
            load.record(kind, time.perf_counter() - t0, error)
    finally:
        client.close()
