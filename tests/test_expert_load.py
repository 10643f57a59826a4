"""Recorded expert load (parallel/expert_load.py): the window's load as a value and a file, the
errors a malformed file gets, and `maverick-ray record-load` against a live /v1/expert-load."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from maverick_ray.config import ConfigError
from maverick_ray.parallel.expert_load import FORMAT, ExpertLoad, LoadFileError, attach_window, load_of_window


def test_window_load_round_trips_through_a_file(tmp_path):
    listeners = []
    engine = SimpleNamespace(add_step_listener=listeners.append)
    window = attach_window(engine, steps=2)
    for counts in ([[3, 0, 1], [0, 4, 0]], [[1, 1, 0], [0, 0, 2]], [[5, 0, 0], [0, 5, 0]]):
        listeners[0](SimpleNamespace(expert_counts=counts, rank_received=[[2, 2], [2, 2]]))
    load = load_of_window(window, moe_layers=[1, 3])
    assert load.tokens == ((6, 1, 0), (0, 5, 2)) and load.window_steps == 2   # the last 2 steps only
    assert load.per_expert() == [6, 6, 2] and load.moe_layers == (1, 3)
    load.save(tmp_path / "load.json")
    assert json.loads((tmp_path / "load.json").read_text())["format"] == FORMAT
    assert ExpertLoad.load(tmp_path / "load.json") == load
    assert load.merged(load).tokens == ((12, 2, 0), (0, 10, 4))


@pytest.mark.parametrize("body,message", [
    ("not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"expert_load": []}, "non-empty list"),
    ({"expert_load": [[1, 2], [1]]}, "expert_load\\[1\\] must be a list of non-negative integers, one per expert \\(2"),
    ({"expert_load": [[1, -2]]}, "expert_load\\[0\\]"),
    ({"expert_load": [[1, 2.5]]}, "expert_load\\[0\\]"),
    ({"expert_load": [[1, 2]], "num_experts": 3}, "num_experts is 3 but each layer lists 2"),
    ({"expert_load": [[1, 2]], "moe_layers": [1, 3]}, "moe_layers must list one layer index per expert_load row"),
    ({"expert_load": [[0, 0]]}, "records no routed tokens"),
    ({"expert_load": [[1, 2]], "format": "other/2"}, "format 'other/2'"),
])
def test_a_malformed_load_file_is_refused_with_what_is_wrong(tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    with pytest.raises(LoadFileError, match=message) as e:
        ExpertLoad.load(path)
    assert str(path) in str(e.value) and isinstance(e.value, ConfigError)


class _FakeServer:
    """/v1/expert-load of a deployment whose step count and window advance between polls."""

    def __init__(self, bodies):
        self.bodies, self.calls = list(bodies), 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                assert self.path == "/v1/expert-load"
                body = owner.bodies[min(owner.calls, len(owner.bodies) - 1)]
                owner.calls += 1
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def _body(step, tokens):
    return {"layers": 1, "expert_load": [tokens], "moe_layers": [1], "window_steps": 4, "num_experts": 3,
            "rank_load": [[1, 1]], "balancedness": [1.0], "ep_size": 2, "stats": {"steps": step, "running": 0}}


def test_record_load_cli_adds_windows_that_do_not_overlap(tmp_path):
    from maverick_ray.cli import main

    # Polls at steps 10, 12 (overlaps the first window: skipped) and 15 (a new window).
    server = _FakeServer([_body(10, [5, 0, 1]), _body(12, [9, 9, 9]), _body(15, [1, 2, 0])])
    try:
        out = tmp_path / "load.json"
        assert main(["record-load", server.url, "--out", str(out), "--samples", "2", "--interval", "0"]) == 0
        load = ExpertLoad.load(out)
        assert load.tokens == ((6, 2, 1),) and load.window_steps == 8 and server.calls == 3
    finally:
        server.httpd.shutdown()


def test_record_load_cli_reports_an_empty_window_and_an_unreachable_server(tmp_path, capsys):
    from maverick_ray.cli import main

    server = _FakeServer([{"layers": 0, "expert_load": [], "window_steps": 0, "stats": {"steps": 0}}])
    try:
        assert main(["record-load", server.url, "--out", str(tmp_path / "x.json")]) == 1
        assert "no routed tokens were recorded yet" in capsys.readouterr().err
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert main(["record-load", server.url, "--out", str(tmp_path / "x.json")]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
