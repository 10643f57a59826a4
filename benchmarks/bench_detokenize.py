"""Per-token cost of turning generated ids into streamed text, at a given output length: the
engine's incremental path (engine/text_output.py TextOutput: a small decode window plus stop
strings) against the path it replaced (decode every output id after each token, then search the
whole text for stop strings).

Prints microseconds per token, measured over the last 100 tokens of an output of each length
(the old path's cost grows with the length, the new one's does not), with and without stop strings.
Usage: .venv/bin/python benchmarks/bench_detokenize.py [--model DIR] [--lengths 128,512,2048]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

TEXT = ("The experts route each token to one of many feed-forward networks; 路由器选择专家 🚀. "
        "Balancedness stays near one when the load is even — ça va. ")
STOPS = ["</answer>", "\n\nUser:"]


def old_path(decode, ids: list[int], upto: int, stops: list[str]) -> None:
    """What engine._on_token did before: full decode, then a search of the text for stop strings."""
    emitted = 0
    for k in range(upto - 100, upto):
        full = decode(ids[:k + 1])
        longest = max((len(s) for s in stops), default=0)
        hits = [i for i in (full.find(s, max(0, emitted - longest + 1)) for s in stops) if i >= 0]
        if not hits:
            emitted = len(full)


def new_path(decode, ids: list[int], upto: int, stops: list[str]) -> float:
    """TextOutput over the whole output; returns the seconds spent on its last 100 tokens."""
    from maverick_ray.engine.text_output import TextOutput

    out, grown = TextOutput(decode, stops), []
    for i in ids[:upto - 100]:
        grown.append(i)
        out.add(grown)
    t = time.perf_counter()
    for i in ids[upto - 100:upto]:
        grown.append(i)
        out.add(grown)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny checkpoint)")
    ap.add_argument("--lengths", default="128,512,2048")
    args = ap.parse_args()
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.checkpoint.writer import write_checkpoint

    ckpt = Path(args.model) if args.model else write_checkpoint(Path(tempfile.mkdtemp()) / "tiny", progress=False)
    tok = ChatTokenizer.from_pretrained(ckpt)
    lengths = [int(n) for n in args.lengths.split(",")]
    ids = tok.encode(TEXT * (max(lengths) // 20 + 1))
    assert len(ids) >= max(lengths)
    print(f"{'tokens':>7} {'stops':>5} {'old us/token':>13} {'new us/token':>13} {'speed-up':>9}")
    for n in lengths:
        for stops in ([], STOPS):
            old = min(_time(lambda: old_path(tok.decode, ids, n, stops)) for _ in range(3)) / 100
            new = min(new_path(tok.decode, ids, n, stops) for _ in range(3)) / 100
            print(f"{n:>7} {len(stops):>5} {old * 1e6:>13.1f} {new * 1e6:>13.1f} {old / new:>8.0f}x")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
