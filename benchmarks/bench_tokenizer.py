"""Encode and decode through the `tokenizers` object underneath transformers' tokenizer (what
ChatTokenizer calls) against transformers' own `encode` / `decode`, on one checkpoint.

Cases: a rendered chat prompt (about 1 kB of text with tools), a short user message, and the
engine's per-token decode of 64 generated ids. Prints the median microseconds per call of each,
after checking both paths give the same ids and text.
Usage: .venv/bin/python benchmarks/bench_tokenizer.py [--model DIR] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def per_call_us(fn, repeat: int, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - t) / repeat * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny checkpoint)")
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.checkpoint.writer import write_checkpoint

    ckpt = Path(args.model) if args.model else write_checkpoint(Path(tempfile.mkdtemp()) / "tiny", progress=False)
    tok = ChatTokenizer.from_pretrained(ckpt)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    prompt = tok.render([{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Tell me a story about a dragon, a wizard and a castle."}],
                        tools=tools)
    short = "Hello! How are you today?"
    out_ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]
    hf = tok.hf
    assert tok.encode(prompt) == hf.encode(prompt, add_special_tokens=False)
    assert tok.decode(out_ids) == hf.decode(out_ids, skip_special_tokens=True)
    cases = [
        (f"encode chat prompt ({len(prompt)} chars)", lambda: tok.encode(prompt),
         lambda: hf.encode(prompt, add_special_tokens=False)),
        (f"encode short text ({len(short)} chars)", lambda: tok.encode(short),
         lambda: hf.encode(short, add_special_tokens=False)),
        (f"decode {len(out_ids)} ids", lambda: tok.decode(out_ids),
         lambda: hf.decode(out_ids, skip_special_tokens=True)),
    ]
    print(f"{'case':40s} {'tokenizers us':>14s} {'transformers us':>16s} {'ratio':>6s}")
    for name, fast, slow in cases:
        a, b = per_call_us(fast, args.repeat), per_call_us(slow, args.repeat)
        print(f"{name:40s} {a:14.1f} {b:16.1f} {b / a:6.1f}")


if __name__ == "__main__":
    main()
