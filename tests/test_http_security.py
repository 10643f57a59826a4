"""The API key on every route but /health (constant-time), the dashboard's login prompt and its
`dashboard_public` exemption, and CORS (off by default, configurable), over the Serve-free HTTP
layer with the fake engine.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from maverick_ray.config import ConfigError
from maverick_ray.serve import auth
from maverick_ray.serve.http_api import Backend, make_api
from maverick_ray.serve.openai_service import OpenAIService
from maverick_ray.serve.settings import API_KEY_ENV, ServeSettings

KEY = "s3cret-k3y~!"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
ORIGIN = "https://app.example"


class Metrics:
    """What EngineMetrics.expert_load returns, enough for the dashboard page to draw."""

    class window:
        steps: list = []

    def expert_load(self):
        return {"ep_size": 2, "num_experts": 4, "window_steps": 3, "moe_layers": [1], "expert_load": [[1, 0, 2, 3]],
                "balancedness": [0.8], "imbalance": [1.2], "idle_fraction": [0.25], "rank_load": [[1, 5]],
                "last_failure_cause": None,
                "stats": {"running": 0, "waiting": 0, "recovering": False, "rank_failures": {}, "recoveries": {}}}


@pytest.fixture
def make_app(fake, tiny_ckpt, tokenizer, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def make(**kw):
        settings = ServeSettings.from_args({"model": str(tiny_ckpt), "served_model_name": "tiny", "ep_size": 1,
                                            "max_model_len": 256, "default_max_tokens": 4, **kw})
        fake.max_model_len = 256
        backend = Backend(OpenAIService(fake, tokenizer, settings, "tiny"), Metrics())
        return make_api(lambda: backend)
    return make


@pytest.fixture
def make_client(make_app):
    clients = []

    def make(**kw) -> TestClient:
        clients.append(TestClient(make_app(**kw)))
        return clients[-1]
    yield make
    for c in clients:
        c.close()


def assert_401(r):
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    assert r.json() == {"error": {"message": auth.MESSAGE, "type": "authentication_error", "param": None,
                                  "code": "invalid_api_key"}}
    assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]


# What each route needs to succeed once the key is right.
CALLS = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
         ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("POST", "/tokenize", {"prompt": "hi"}),
         ("POST", "/detokenize", {"tokens": [5]}), ("GET", "/v1/engine/stats", None), ("GET", "/v1/expert-load", None),
         ("POST", "/v1/debug/force-expert", {"expert": 1}), ("GET", "/openapi.json", None), ("GET", "/docs", None),
         ("GET", "/redoc", None)]


def test_every_route_but_health_needs_the_key(make_client, fake):
    http = make_client(api_key=KEY, enable_test_hooks=True)
    routes = {(m, r.path) for r in http.app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    routes -= {("GET", "/docs/oauth2-redirect")}
    assert {(m, p) for m, p, _ in CALLS} | {("GET", "/health"), ("GET", "/dashboard")} == routes  # none forgotten
    for method, path, body in CALLS:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": "Basic " + KEY}, {"Authorization": AUTH["Authorization"] + "x"},
                        {"Authorization": AUTH["Authorization"][:-1]}):
            assert_401(http.request(method, path, json=body, headers=headers))
        ok = http.request(method, path, json=body, headers=AUTH)
        assert ok.status_code == 200, (path, ok.text)
    for path in ("/no/such/route", "/v1/embeddings"):  # unknown paths do not tell an unauthenticated caller
        assert_401(http.get(path))
        assert http.get(path, headers=AUTH).status_code == 404
    assert http.get("/health").status_code == 200
    # the scheme is case-insensitive, as RFC 9110 says; the body is never read without the key
    assert http.get("/v1/models", headers={"Authorization": "bearer " + AUTH["Authorization"][7:]}).status_code == 200
    assert_401(http.post("/v1/chat/completions", content=b"{not json"))
    assert len(fake.requests) == 2  # the two authorised generation calls only


def test_key_comparison_is_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.key_matches("k1", "Bearer k1") and not auth.key_matches("k1", "Bearer k2")
    assert not auth.key_matches("k1", None) and not auth.key_matches("k1", "Token k1")
    assert len(calls) == 4 and all(len(a) == len(b) == 32 for a, b in calls)  # digests: the length says nothing


def test_route_path_under_a_serve_route_prefix():
    assert auth.route_path({"path": "/limits/health", "root_path": "/limits"}) == "/health"
    assert auth.route_path({"path": "/limits", "root_path": "/limits"}) == "/"
    assert auth.route_path({"path": "/health", "root_path": "/limits"}) == "/health"
    assert auth.route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"


def test_prefixed_app_checks_the_key_on_its_own_routes(make_app):
    with TestClient(make_app(api_key=KEY), root_path="/tenant") as http:
        assert http.get("/tenant/health").status_code == 200
        assert_401(http.get("/tenant/v1/models"))
        assert http.get("/tenant/v1/models", headers=AUTH).status_code == 200


def test_dashboard_page_loads_without_the_key_and_asks_for_it(make_client):
    http = make_client(api_key=KEY)
    page = http.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<form id="login"' in html and 'type="password"' in html
    assert "fetch('v1/expert-load', {headers: authHeaders()})" in html and "'Bearer ' + key" in html
    assert_401(http.get("/v1/expert-load"))


def test_dashboard_public_exempts_only_the_page_and_its_data(make_client):
    http = make_client(api_key=KEY, dashboard_public=True)
    assert http.get("/v1/expert-load").json()["ep_size"] == 2
    assert http.get("/dashboard").status_code == 200
    for path in ("/v1/engine/stats", "/v1/models"):
        assert_401(http.get(path))
    assert_401(http.post("/v1/expert-load"))  # only GET is exempt (405 once authorised)


# ---- the dashboard in a browser ------------------------------------------------------------------
@pytest.fixture
def live_url(make_app):
    """The app on a real socket (uvicorn in a thread), for headless Chromium."""
    from serve_fixtures import app_on_loopback

    with app_on_loopback(make_app(api_key=KEY), join_timeout=10) as url:
        yield url


def dump_dom(url: str, work) -> tuple[dict, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium package is needed to run the page")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={work}", "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))), dom


def test_dashboard_login_in_a_browser(live_url, tmp_path):
    data, dom = dump_dom(live_url + "/dashboard", tmp_path / "a")
    assert data.get("auth") == "needed" and "waiting for the API key" in dom
    assert re.search(r'<form id="login"(?![^>]*hidden)', dom)   # the prompt is shown
    # the key in the URL fragment (never sent to the server): the page polls with it and draws
    from urllib.parse import quote

    data, dom = dump_dom(live_url + "/dashboard#key=" + quote(KEY), tmp_path / "b")
    assert data.get("auth") == "ok" and data.get("nonzero-cells") == "3", data
    assert "EP=2, 4 experts" in dom and re.search(r'<form id="login"[^>]*hidden', dom)
    data, dom = dump_dom(live_url + "/dashboard#key=wrong", tmp_path / "c")
    assert data.get("auth") == "needed" and "that key was refused" in dom


# ---- CORS ------------------------------------------------------------------------------------------
def preflight(http: TestClient, origin: str = ORIGIN, path: str = "/v1/chat/completions"):
    return http.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})


def test_cors_is_off_by_default(make_client):
    http = make_client()
    r = preflight(http)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins_before_the_key_check(make_client):
    http = make_client(api_key=KEY, cors_allow_origins=[ORIGIN, "http://localhost:3000"])
    r = preflight(http)   # browsers send preflights without the key
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
    assert preflight(http, "https://evil.example").status_code == 400
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1},
                  headers={"Origin": ORIGIN, **AUTH})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = http.get("/v1/models", headers={"Origin": ORIGIN})   # the browser can read the 401
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.get("/v1/models", headers={"Origin": "https://evil.example", **AUTH})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_settings_are_validated():
    assert ServeSettings.from_args({"cors_allow_origins": "https://a.example, https://b.example"}
                                   ).cors_allow_origins == ["https://a.example", "https://b.example"]
    assert ServeSettings.from_args({}).cors_allow_origins is None
    with pytest.raises(ConfigError, match="cors_allow_origins"):
        ServeSettings.from_args({"cors_allow_origins": [1]})
    with pytest.raises(ConfigError, match="cors_allow_credentials"):
        ServeSettings.from_args({"cors_allow_origins": ["*"], "cors_allow_credentials": True})
    with pytest.raises(ConfigError, match="dashboard_public"):
        ServeSettings.from_args({"dashboard_public": "yes"})
    with pytest.raises(ConfigError, match="api_key must be printable ASCII"):
        ServeSettings.from_args({"api_key": "cl\u00e9"})
    with pytest.raises(ConfigError, match="unknown application args"):
        ServeSettings.from_args({"cors_origins": ["*"]})
