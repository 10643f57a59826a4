"""A direct socket from the engine to each Ray rank, for the per-step plan and result.

Stepping the ranks through Ray actor calls cost the engine 3.8 ms per EP = 2 decode step beyond
the ranks' own compute on a 2-core host (scheduling, the object store, the replies); over this
channel it is 0.9 ms (BENCHMARKS.md). Ray still creates, places, sets up and kills the ranks,
and carries every other call; only the step, which runs many times a second, goes over this
channel. A compiled Ray graph was tried for the same purpose and dropped: its channel readers
busy-wait a core per actor.

Each rank listens on its Ray node IP (the address its peers and the engine already reach it
on) and accepts one connection that presents the engine's secret token (sent through Ray's
setup call) before anything is unpickled. Messages are an 8-byte big-endian length and a
pickle. The rank replies to every plan with `(True, RankResult)` or `(False, error type,
message)`; a rank whose process dies closes its socket, which the engine reads as a failure at
once; a rank that hangs runs into the engine's step timeout. Nothing here spins: both ends
block in the kernel between messages.
"""

from __future__ import annotations

import hmac
import logging
import pickle
import secrets
import select
import socket
import struct
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
TOKEN_BYTES = 32


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def _send(sock: socket.socket, obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


class ChannelClosed(ConnectionError):
    """The peer closed its end: an engine that went away, or a rank whose process died."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ChannelClosed("the peer closed the step channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


class StepServer:
    """Rank side: serves `handler(plan) -> result` to the one engine that holds the token."""

    def __init__(self, host: str, token: bytes, handler: Callable[[Any], Any], accept_timeout: float = 600.0):
        self._token, self._handler = token, handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # Ray node IPs may be IPv6
        self._listener = socket.create_server((host, 0), family=family)
        self.address = (host, self._listener.getsockname()[1])
        self._accept_deadline = time.monotonic() + accept_timeout
        self._conn: socket.socket | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="maverick-step-channel", daemon=True)
        self._thread.start()

    def _accept(self) -> socket.socket | None:
        """The first connection that presents the token; others are closed unread."""
        while time.monotonic() < self._accept_deadline:
            self._listener.settimeout(max(0.1, self._accept_deadline - time.monotonic()))
            try:
                conn, peer = self._listener.accept()
            except OSError:  # the accept timeout, or close()
                break
            conn.settimeout(10.0)
            try:
                ok = hmac.compare_digest(_recv_exact(conn, TOKEN_BYTES), self._token)
            except (OSError, ConnectionError):
                ok = False
            if ok:
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            log.warning("step channel: closed a connection from %s without the engine's token", peer)
            conn.close()
        return None

    def _run(self) -> None:
        try:
            conn = self._accept()
        finally:
            self._listener.close()
        if conn is None:
            if not self._closed:
                log.error("step channel: no engine connected within the accept timeout")
            return
        self._conn = conn
        if self._closed:  # closed while accepting
            conn.close()
            return
        with conn:
            while True:
                try:
                    plan = _recv(conn)
                except (OSError, ConnectionError):  # the engine went away
                    return
                try:
                    reply = (True, self._handler(plan))
                except Exception as e:  # the rank's own error goes back to the engine
                    reply = (False, type(e).__name__, str(e))
                try:
                    _send(conn, reply)
                except OSError:
                    return


    def close(self) -> None:
        """Stops serving: the engine's connection (if any) is shut down, so a reply still owed
        for a failed step goes nowhere. A rank that rejoins a new group opens a new server."""
        self._closed = True
        self._accept_deadline = 0.0
        for s in (self._conn, self._listener):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)


class StepClient:
    """Engine side: one connection per rank; `exchange` sends every rank its message and
    collects the replies, surfacing the first failure at once."""

    def __init__(self, addresses: list[tuple[str, int]], token: bytes, connect_timeout: float = 30.0):
        self.socks: list[socket.socket] = []
        try:
            for host, port in addresses:
                s = socket.create_connection((host, port), timeout=connect_timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(token)
                self.socks.append(s)
        except BaseException:
            self.close()
            raise

    def exchange(self, messages: list[Any], timeout: float) -> list[Any]:
        """Sends messages[r] to rank r; returns the replies in rank order.

        Raises RankFailed(rank, kind, detail) for the first rank that replies with an error or
        whose connection closes, and StepTimeout (a TimeoutError naming the ranks that owe a
        reply) when some rank has not replied in `timeout` s."""
        deadline = time.monotonic() + timeout
        for rank, (sock, msg) in enumerate(zip(self.socks, messages)):
            sock.settimeout(timeout)
            try:
                _send(sock, msg)
            except OSError as e:
                raise RankFailed(rank, "ConnectionError", f"could not send the step: {e}") from e
        replies: list[Any] = [None] * len(self.socks)
        pending = {sock.fileno(): rank for rank, sock in enumerate(self.socks)}
        poller = select.poll()  # poll, not select: a Ray process may hold file descriptors past 1024
        for fd in pending:
            poller.register(fd, select.POLLIN)
        while pending:
            left = deadline - time.monotonic()
            ready = [fd for fd, _ in poller.poll(left * 1000)] if left > 0 else []
            if not ready:
                raise StepTimeout(sorted(pending.values()),
                                  f"{len(pending)} of {len(self.socks)} ranks did not finish a step within {timeout:.0f}s")
            for fd in ready:
                rank = pending.pop(fd)
                poller.unregister(fd)
                sock = self.socks[rank]
                # A rank sends its reply whole once it starts; reading it to the end stays within the deadline.
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                try:
                    reply = _recv(sock)
                except socket.timeout:
                    raise StepTimeout([rank], f"rank {rank} did not finish sending its step within {timeout:.0f}s") from None
                except ChannelClosed:
                    raise RankFailed(rank, "ConnectionError", "its process exited (the step channel closed)") from None
                except OSError as e:
                    raise RankFailed(rank, "ConnectionError", f"step channel failed: {e}") from e
                if not reply[0]:
                    # A peer that died makes the others' all-to-all fail too; its closed channel
                    # is already readable by then. Blame the dead rank, not the one that noticed.
                    dead = self.closed_ranks([self.socks[r] for r in pending.values()])
                    if dead:
                        raise RankFailed(dead[0], "ConnectionError", "its process exited (the step channel closed)")
                    raise RankFailed(rank, reply[1], reply[2])
                replies[rank] = reply[1]
        return replies

    def closed_ranks(self, socks: list[socket.socket] | None = None) -> list[int]:
        """The ranks (of `socks`, default all) whose end of the channel has closed, i.e. whose
        process exited. Between exchanges, or for ranks whose reply is still owed (a reply in
        flight is not a close). Does not block."""
        rank_of = {sock.fileno(): self.socks.index(sock) for sock in (self.socks if socks is None else socks)}
        poller = select.poll()
        for fd in rank_of:
            poller.register(fd, select.POLLIN)
        closed = []
        for fd, _ in poller.poll(0):
            sock = self.socks[rank_of[fd]]
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    closed.append(rank_of[fd])
            except BlockingIOError:
                pass
            except OSError:
                closed.append(rank_of[fd])
        return sorted(closed)

    def __enter__(self) -> "StepClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks = []


class StepTimeout(TimeoutError):
    """Some ranks did not finish a step in time: `ranks` owe their reply. A hung rank is among
    them, and so may be peers blocked in a collective waiting for it."""

    def __init__(self, ranks: list[int], message: str):
        super().__init__(message)
        self.ranks = ranks


class RankFailed(RuntimeError):
    """A rank's step failed: it raised (kind is its exception type) or its process died; the
    message names the rank and the rank's own error."""

    def __init__(self, rank: int, kind: str, detail: str):
        lines = str(detail).strip().splitlines()
        self.rank, self.kind, self.detail = rank, kind, lines[0] if lines else ""
        super().__init__(f"rank {rank} failed: {kind}: {self.detail}")
