"""`n` choices of one OpenAI request: n engine sequences, read together.

Each choice is its own engine request (id `<engine id>-<index>` when n > 1) with the same prompt
and, when the request has a `seed`, seed + index, so every choice is reproducible on its own
and a request with n = 1 and seed s + i gives choice i. The prompt is shared by the choices
through the engine's prefix cache (KV blocks of the same prompt), not by a fork of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..engine.sampling import SamplingParams


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s parameters: the request's, with seed + index when it has a seed."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def choice_ids(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}-{i}" for i in range(n)]


async def merged(streams: list):
    """Yields (choice index, TokenEvent) from every stream as events arrive, until each stream
    has sent its final event."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for ev in s:
                await queue.put((i, ev, None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, ev, err = await queue.get()
            if err is not None:
                raise err
            yield i, ev
            if ev.finished:
                left -= 1
    finally:
        for t in tasks:
            t.cancel()
