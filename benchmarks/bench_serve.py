"""Load benchmark against the real Serve endpoint (tiny model, local Ray on 127.0.0.1).

For each concurrency level, sends a bounded number of streaming chat requests and reports
output tokens/s, time to first token p50/p99 and errors.
Usage: .venv/bin/python benchmarks/bench_serve.py [--concurrency 1 8 32 64 --requests-per-client 3 --ep 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import machine_line, write_section  # noqa: E402


def one_request(session, url, max_tokens):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story about experts."}],
            "max_tokens": max_tokens, "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with session.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        if r.status_code != 200:
            return None, 0
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


def level(url, concurrency, per_client, max_tokens):
    import requests
    from concurrent.futures import ThreadPoolExecutor

    def worker(_):
        with requests.Session() as session:
            return [one_request(session, url, max_tokens) for _ in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(worker, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] is not None]
    ttfts = sorted(r[0] for r in ok)
    p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")  # noqa: E731
    return {"tok_s": sum(r[1] for r in ok) / wall, "p50": statistics.median(ttfts) if ttfts else float("nan"),
            "p99": p(0.99), "errors": len(results) - len(ok), "requests": len(results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from serve_fixtures import start_serve, stop_serve

    from maverick_ray.checkpoint.writer import ensure_tiny_checkpoint

    print("starting Serve ...", flush=True)
    url = start_serve({"/": {"model": str(ensure_tiny_checkpoint()), "served_model_name": "tiny", "ep_size": args.ep,
                             "max_num_seqs": 64, "max_model_len": 512}}, num_cpus=args.ep + 2)
    rows = []
    try:
        level(url, 2, 1, 4)  # warm-up
        for c in args.concurrency:
            print(f"concurrency {c} ...", flush=True)
            r = level(url, c, args.requests_per_client, args.max_tokens)
            rows.append(f"| {c} | {r['requests']} | {r['tok_s']:.0f} | {r['p50'] * 1e3:.0f} ms | "
                        f"{r['p99'] * 1e3:.0f} ms | {r['errors']} |")
    finally:
        stop_serve()
    table = ("| concurrency | requests | output tok/s | TTFT p50 | TTFT p99 | errors |\n|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    print(table)
    if not args.no_write:
        write_section("bench_serve", f"## Serve endpoint load (issue: Ray Serve deployment)\n\nTiny model, EP={args.ep}, "
                      f"one replica, streaming chat requests of {args.max_tokens} tokens, "
                      f"{args.requests_per_client} per client. Machine: {machine_line()}.\n\n{table}\n\n"
                      f"Command: `.venv/bin/python benchmarks/bench_serve.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
