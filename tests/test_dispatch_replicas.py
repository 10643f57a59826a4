"""AllToAllDispatcher with replicated experts over a real two-process gloo group: both exchanges
spread a hot expert's rows over its copies by the same rule and bring every result back."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from maverick_ray.parallel.placement import ExpertPlacement

from serve_fixtures import free_port

C, WORLD = 4, 2
PLACEMENT = ExpertPlacement.contiguous(8, WORLD, redundant=2)     # (0 1 2 3 4) (5 6 7 0 1)
IDS = {0: [0, 0, 0, 0, 5, 1], 1: [0, 0, 7, 1]}


def _rows(rank: int):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(len(IDS[rank]), C, generator=g), torch.tensor(IDS[rank])


def _rank_main(rank: int, address: str, results):
    import deepspeed

    from maverick_ray.parallel.all_to_all import AllToAllDispatcher

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", init_method=address, rank=rank, world_size=WORLD,
                               auto_mpi_discovery=False, verbose=False)
    out = {}
    for mode, limit in (("padded", 10_000), ("counted", 0)):
        d = AllToAllDispatcher(PLACEMENT, rank, padded_max_rows=limit)
        d.begin_step(max(len(v) for v in IDS.values()))
        x, ids = _rows(rank)
        rows, local, handle = d.dispatch(x, ids, layer=0)
        experts = torch.tensor(PLACEMENT.experts_of(rank))[local]       # the expert in each receiving slot
        y = rows * (experts + 1).to(rows.dtype)[:, None]
        out[mode] = (d.combine(y, handle).tolist(), sorted(experts.tolist()))
    results.put((rank, out))


def test_a_hot_experts_rows_are_spread_over_its_replicas_and_come_back():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, address, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for mode in ("padded", "counted"):
        for rank in range(WORLD):
            x, ids = _rows(rank)
            back = torch.tensor(got[rank][mode][0]).reshape(-1, C)
            assert torch.allclose(back, x * (ids + 1).to(x.dtype)[:, None]), (mode, rank)
        # First step (rotation 1): rank 0's four rows for expert 0 alternate copies (slots 8, 0, 8, 0),
        # rank 1's two start one later (0, 8); expert 1's single rows go to different copies (9 and 1).
        assert got[0][mode][1] == [0, 0, 0, 1], mode
        assert got[1][mode][1] == [0, 0, 0, 1, 5, 7], mode
