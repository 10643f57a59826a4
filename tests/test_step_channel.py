"""The engine-to-rank step channel: replies in rank order, the token gate, and every way a
rank can fail (raises, dies, hangs) surfacing as a clear error instead of a hang."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from maverick_ray.engine.step_channel import RankFailed, StepClient, StepServer, new_token


def _servers(handlers, token):
    return [StepServer("127.0.0.1", token, h, accept_timeout=30) for h in handlers]


def test_replies_come_back_in_rank_order_over_many_steps():
    token = new_token()
    servers = _servers([lambda m, r=r: {"rank": r, "echo": m} for r in range(3)], token)
    with StepClient([s.address for s in servers], token) as client:
        for step in range(50):
            msgs = [{"step": step, "payload": list(range(r * 1000))} for r in range(3)]
            got = client.exchange(msgs, timeout=10)
            assert [g["rank"] for g in got] == [0, 1, 2]
            assert [g["echo"] for g in got] == msgs


def test_works_when_the_engine_process_holds_more_than_1024_file_descriptors():
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the hard open-file limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # like a busy Ray driver
    try:
        token = new_token()
        servers = _servers([lambda m, r=r: (r, m) for r in range(2)], token)
        with StepClient([s.address for s in servers], token) as client:
            assert min(s.fileno() for s in client.socks) > 1024
            assert client.exchange(["a", "b"], timeout=5) == [(0, "a"), (1, "b")]
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_large_reply_arrives_whole():
    token = new_token()
    blob = bytes(range(256)) * 40000  # ~10 MB: many recv calls
    (server,) = _servers([lambda m: blob], token)
    with StepClient([server.address], token) as client:
        assert client.exchange([None], timeout=30) == [blob]


def test_an_ipv6_node_address_works():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    token = new_token()
    try:
        server = StepServer("::1", token, lambda m: m * 2, accept_timeout=30)
    except OSError as e:  # IPv6 disabled on loopback
        pytest.skip(f"no IPv6 loopback here: {e}")
    with StepClient([server.address], token) as client:
        assert client.exchange([21], timeout=5) == [42]


def test_a_connection_without_the_token_is_refused_and_the_engine_still_connects():
    token = new_token()
    (server,) = _servers([lambda m: m + 1], token)
    with socket.create_connection(server.address) as intruder:
        intruder.sendall(b"x" * 32)
        intruder.settimeout(5)
        assert intruder.recv(1) == b""  # closed unread
    with StepClient([server.address], token) as client:
        assert client.exchange([41], timeout=5) == [42]


def test_a_raising_rank_fails_at_once_while_its_peer_is_still_busy():
    token = new_token()
    release = threading.Event()

    def blocked(m):  # like a peer stuck in the collective its failed partner never joins
        release.wait(30)
        return m

    def raises(m):
        raise ValueError("injected fault\nsecond line")

    servers = _servers([blocked, raises], token)
    client = StepClient([s.address for s in servers], token)
    try:
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match=r"^rank 1 failed: ValueError: injected fault$") as info:
            client.exchange([1, 2], timeout=30)
        assert time.monotonic() - t0 < 5
        assert info.value.rank == 1
    finally:
        release.set()
        client.close()


_DYING_RANK = """
import os, sys, time
from maverick_ray.engine.step_channel import StepServer
def step(plan):
    os._exit(3)  # the process dies mid-step, as a killed or crashed rank does
server = StepServer("127.0.0.1", bytes.fromhex(sys.argv[1]), step, accept_timeout=60)
print(server.address[1], flush=True)
time.sleep(60)
"""


def test_a_rank_whose_process_dies_fails_the_step_at_once():
    token = new_token()
    release, client = threading.Event(), None
    proc = subprocess.Popen([sys.executable, "-c", _DYING_RANK, token.hex()], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        (alive,) = _servers([lambda m: release.wait(30)], token)
        client = StepClient([alive.address, ("127.0.0.1", port)], token)
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match=r"rank 1 failed: ConnectionError: .*closed"):
            client.exchange([1, 2], timeout=30)
        assert time.monotonic() - t0 < 5
        assert proc.wait(5) == 3
    finally:
        release.set()
        proc.kill()
        if client is not None:
            client.close()


def test_a_hung_rank_times_out():
    token = new_token()
    release = threading.Event()
    servers = _servers([lambda m: m, lambda m: release.wait(30)], token)
    client = StepClient([s.address for s in servers], token)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="1 of 2 ranks did not finish a step within 1s"):
            client.exchange([1, 2], timeout=1)
        assert time.monotonic() - t0 < 3
    finally:
        release.set()
        client.close()
