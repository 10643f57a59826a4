"""All-to-all latency between expert-parallel rank processes on one host: the host group's
shared-memory exchange (the engine's default for CPU ranks) against gloo, in the same processes.

Each rank process runs both transports on the same group (the host group keeps a gloo group
inside), alternating in every round: a gloo barrier, then `--calls` back-to-back all-to-alls,
whose mean is the round's figure; medians over rounds. Sizes are the `mini` model's packed rows
(512 fp32 + an 8-byte id = 2056 bytes): a decode step's padded exchange and a prefill's.
Usage: .venv/bin/python benchmarks/bench_all_to_all.py [--world 2 4 --rounds 7 --calls 200]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, write_section  # noqa: E402

ROW_BYTES = 512 * 4 + 8
SIZES = {"decode (32 rows per peer)": 32, "prefill (1024 rows per peer)": 1024}


def _rank(rank: int, world: int, address: str, rounds: int, calls: int, results) -> None:
    import deepspeed
    import torch.distributed as dist

    from maverick_ray.parallel.host_group import register

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend=register(), init_method=address, rank=rank, world_size=world,
                               auto_mpi_discovery=False, verbose=False)
    pg = dist.group.WORLD
    assert pg.shared_memory, pg.fallback_reason
    out = {}
    for name, rows in SIZES.items():
        x = torch.zeros(rows * world, ROW_BYTES, dtype=torch.uint8)
        y = torch.empty_like(x)
        ways = {"shared memory": lambda: dist.all_to_all_single(y, x),
                "gloo": lambda: pg._gloo.alltoall_base(y, x, [], [], dist.AllToAllOptions()).wait()}
        per = {k: [] for k in ways}
        for _ in range(rounds + 1):          # the first round warms up
            for way, fn in ways.items():
                pg._gloo.barrier().wait()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                per[way].append((time.perf_counter() - t0) / calls)
        out[name] = {k: statistics.median(v[1:]) for k, v in per.items()}
    results.put((rank, out))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="back-to-back all-to-alls per round and transport")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    lines = ["| ranks | message | shared memory | gloo | gloo / shared memory |", "|---|---|---|---|---|"]
    for world in args.world:
        print(f"{world} ranks ...", flush=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, f"tcp://127.0.0.1:{port}", args.rounds, args.calls,
                                                 results)) for r in range(world)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        for name in SIZES:
            shm = max(got[r][name]["shared memory"] for r in got)   # the slowest rank's view
            gloo = max(got[r][name]["gloo"] for r in got)
            lines.append(f"| {world} | {name} | {shm * 1e6:.0f} us | {gloo * 1e6:.0f} us | {gloo / shm:.1f}x |")
    text = "\n".join(lines) + f"\n\n- machine: {machine_line()}; {args.rounds} rounds of {args.calls} calls\n"
    print(text)
    if not args.no_write:
        write_section("bench_all_to_all", "## All-to-all between rank processes on one host (issue: expert-parallel "
                      "engine)\n\nOne rank process per rank, one thread each, both transports in the same processes "
                      "and rounds (shared memory: the host group's exchange, `native/shm_exchange.c`; gloo over "
                      "loopback TCP), time per call over back-to-back calls, medians over rounds, the slowest "
                      f"rank's figure. Rows of 2056 bytes (the `mini` model's packed rows).\n\n{text}\nCommand: "
                      "`.venv/bin/python benchmarks/bench_all_to_all.py`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
