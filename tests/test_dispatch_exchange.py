"""AllToAllDispatcher over a real two-process group (deepspeed.init_distributed; gloo, and the host
group whose all-to-all goes through shared memory): the padded
one-collective exchange and the counted two-collective exchange deliver every routed row to the
rank that owns its expert and bring each result back to its row, in order, dropping nothing."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from maverick_ray.parallel.placement import ExpertPlacement

from serve_fixtures import free_port

E, C, WORLD = 8, 6, 2
ROWS = {0: [5, 0], 1: [3, 7], 2: [0, 0]}  # rows each rank routes, per case (a rank may have none)


def _rows(case: int, rank: int):
    g = torch.Generator().manual_seed(100 * case + rank)
    n = ROWS[case][rank]
    return torch.randn(n, C, generator=g), torch.randint(0, E, (n,), generator=g)


def _rank_main(rank: int, address: str, results, backend: str):
    import deepspeed

    from maverick_ray.parallel import host_group
    from maverick_ray.parallel.all_to_all import AllToAllDispatcher

    torch.set_num_threads(1)
    if backend == host_group.BACKEND:
        host_group.register()
    deepspeed.init_distributed(dist_backend=backend, init_method=address, rank=rank, world_size=WORLD,
                               auto_mpi_discovery=False, verbose=False)
    placement = ExpertPlacement.contiguous(E, WORLD)
    out = {}
    for mode, limit in (("padded", 10_000), ("counted", 0)):
        d = AllToAllDispatcher(placement, rank, padded_max_rows=limit)
        for case in ROWS:
            d.begin_step(max(ROWS[case]))
            x, ids = _rows(case, rank)
            rows, local_ids, handle = d.dispatch(x, ids, layer=0)
            # A stand-in expert that shows which expert and rank saw the row: y = row * (global id + 1).
            global_ids = torch.tensor(placement.experts_of(rank), dtype=torch.long)[local_ids]
            y = rows * (global_ids + 1).to(rows.dtype)[:, None]
            out[(mode, case)] = (d.combine(y, handle).tolist(), sorted(global_ids.tolist()), d.slots_per_peer)
    out["shared_memory"] = getattr(torch.distributed.group.WORLD, "shared_memory", False)
    results.put((rank, out))  # plain lists: tensors would be shared with a process about to exit


@pytest.mark.parametrize("backend", ["gloo", "maverick_host"])
def test_padded_and_counted_exchanges_return_every_row_from_its_owner(backend):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, address, results, backend)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [got[r].pop("shared_memory") for r in range(WORLD)] == [backend == "maverick_host"] * WORLD
    placement = ExpertPlacement.contiguous(E, WORLD)
    for case in ROWS:
        routed = [_rows(case, r) for r in range(WORLD)]
        for mode in ("padded", "counted"):
            for rank in range(WORLD):
                x, ids = routed[rank]
                back, seen, slots = got[rank][(mode, case)]
                assert torch.allclose(torch.tensor(back).reshape(-1, C), x * (ids + 1).to(x.dtype)[:, None]), (mode, case, rank)
                # The rank's experts saw exactly the rows all ranks routed to them.
                mine = set(placement.experts_of(rank))
                assert seen == sorted(int(i) for _, ids_r in routed for i in ids_r if int(i) in mine)
                assert slots == (max(ROWS[case]) or None if mode == "padded" else None)


def test_padded_exchange_refuses_more_rows_than_its_slots_before_any_collective():
    """The engine sizes a step's slots from the most rows any rank routes; a rank routing more
    raises at once instead of sending a message its peers would misread."""
    from maverick_ray.parallel.all_to_all import AllToAllDispatcher

    d = AllToAllDispatcher(ExpertPlacement.contiguous(E, WORLD), 0)  # no process group: nothing may be sent
    d.begin_step(2)
    with pytest.raises(RuntimeError, match="routes 3 rows, more than the step's 2 slots per peer"):
        d.dispatch(torch.randn(3, C), torch.tensor([0, 5, 7]), layer=0)
