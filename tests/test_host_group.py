"""The host process group (parallel/host_group.py): all_to_all_single over shared memory between
processes of one host, checked against gloo on the same inputs; split disagreements, a peer that
exits and a peer that never comes fail with an error instead of hanging; a group whose ranks
cannot all map the segment falls back to gloo on every rank."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from serve_fixtures import free_port


def _init(rank: int, world: int, address: str, timeout_s: float = 60):
    """The group as the engine's ranks make it: DeepSpeed's init_distributed with our backend."""
    import deepspeed
    import torch.distributed as dist

    from maverick_ray.parallel.host_group import register

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend=register(), init_method=address, rank=rank, world_size=world,
                               timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=False, verbose=False)
    return dist, dist.group.WORLD


def _gloo_a2a(dist, pg, out, inp, out_splits, in_splits):
    pg._gloo.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions()).wait()


def _cases(world: int):
    """(name, dtype, trailing shape, counts[s][d] rows from s to d)."""
    g = torch.Generator().manual_seed(7)
    random = torch.randint(0, 40, (world, world), generator=g)
    random[0, world - 1] = 0                                   # an empty block
    large = torch.full((world, world), 3000)                   # 3000 x 1 KiB rows: past a 1 MiB ring
    return [("random", torch.float32, (5,), random), ("ids", torch.int64, (), random.T.contiguous()),
            ("3-d bf16", torch.bfloat16, (3, 4), random), ("larger than the ring", torch.float32, (256,), large),
            ("nothing at all", torch.float32, (8,), torch.zeros(world, world, dtype=torch.long))]


def _matches_gloo_main(rank: int, world: int, address: str, results):
    dist, pg = _init(rank, world, address)
    import deepspeed.comm as ds

    out = {"shared_memory": pg.shared_memory}
    for name, dtype, tail, counts in _cases(world):
        send, recv = counts[rank].tolist(), counts[:, rank].tolist()
        x = (torch.arange(sum(send) * max(1, int(torch.tensor(tail).prod())), dtype=torch.float32)
             .reshape(sum(send), *tail) + 100_000 * rank).to(dtype)
        got, ref = torch.empty(sum(recv), *tail, dtype=dtype), torch.empty(sum(recv), *tail, dtype=dtype)
        dist.all_to_all_single(got, x, recv, send)                      # torch.distributed
        _gloo_a2a(dist, pg, ref, x, recv, send)
        again = torch.empty_like(got)
        ds.all_to_all_single(again, x, output_split_sizes=recv, input_split_sizes=send)  # DeepSpeed on top
        out[name] = torch.equal(got, ref) and torch.equal(again, ref)
    # Equal splits (no sizes) and a non-contiguous output.
    x = torch.arange(world * 6, dtype=torch.float32).reshape(world * 2, 3) + 10 * rank
    got, ref = torch.empty(3, world * 2).T, torch.empty(world * 2, 3)
    dist.all_to_all_single(got, x)
    _gloo_a2a(dist, pg, ref, x, [], [])
    out["equal splits, strided output"] = torch.equal(got, ref)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)          # the other collectives are gloo's
    dist.barrier()
    out["all_reduce, barrier"] = total.item() == world * (world + 1) / 2
    results.put((rank, out))
    dist.destroy_process_group()


def _spawn(target, world: int, *args):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=target, args=(r, world, address, results, *args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs, results


def _collect(procs, results, timeout=120):
    """Each rank's result; fails fast when a rank died without one."""
    import queue

    got, deadline = {}, time.monotonic() + timeout
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            rank, value = results.get(timeout=1)
            got[rank] = value
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
            assert not dead, f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
    for p in procs:
        p.join(timeout=60)
    return got


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_all_to_all_matches_gloo(world):
    procs, results = _spawn(_matches_gloo_main, world)
    got = _collect(procs, results)
    assert all(p.exitcode == 0 for p in procs)
    for rank, out in got.items():
        assert out.pop("shared_memory") is True, f"rank {rank} did not use shared memory"
        assert all(out.values()), (rank, out)


def _disagree_main(rank: int, world: int, address: str, results):
    dist, pg = _init(rank, world, address)
    x = torch.zeros(5 if rank == 0 else 4, 2)
    out = torch.empty(4, 2)
    # Rank 0 sends 3 rows to rank 1, which expects 2.
    send, recv = ([2, 3], [2, 2]) if rank == 0 else ([2, 2], [2, 2])
    errors = []
    for _ in range(2 if rank == 1 else 1):  # rank 0's exchange completes; rank 1 tries again
        try:
            dist.all_to_all_single(out, x, recv, send)
            errors.append(None)
        except RuntimeError as exc:
            errors.append(str(exc))
    results.put((rank, errors))


def test_ranks_that_disagree_on_split_sizes_get_an_error_and_the_group_refuses_more():
    procs, results = _spawn(_disagree_main, 2)
    got = _collect(procs, results)
    first, second = got[1]
    assert "rank 0 sent 24 bytes where 16 were expected" in first and "disagree" in first
    assert "failed earlier" in second


def _failing_a2a(dist, out, x) -> tuple[str, float]:
    """(the error an all-to-all raised, or "no error"; seconds it took)."""
    t0 = time.monotonic()
    try:
        dist.all_to_all_single(out, x)
        return "no error", time.monotonic() - t0
    except RuntimeError as exc:
        return str(exc), time.monotonic() - t0


def _peer_exits_main(rank: int, world: int, address: str, results, timeout_s):
    dist, pg = _init(rank, world, address, timeout_s=timeout_s)
    x, out = torch.zeros(4, 2), torch.empty(4, 2)
    dist.all_to_all_single(out, x)   # one exchange that works
    if rank == 1:
        results.put((1, "gone"))
        results.close()
        results.join_thread()
        os._exit(0)
    time.sleep(0.5)                  # rank 1 is gone by now
    results.put((0, _failing_a2a(dist, out, x)))
    results.close()
    results.join_thread()
    os._exit(0)   # a group with a dead member can take a minute to tear down; the test is over


def test_a_peer_that_exits_fails_the_exchange_at_once_not_at_the_timeout():
    procs, results = _spawn(_peer_exits_main, 2, 120.0)
    msg, waited = _collect(procs, results)[0]
    assert "rank 1 exited during the exchange" in msg
    assert waited < 5, f"took {waited:.1f} s (the group's timeout is 120 s)"


def _peer_absent_main(rank: int, world: int, address: str, results, timeout_s, gave_up):
    dist, pg = _init(rank, world, address, timeout_s=timeout_s)
    x, out = torch.zeros(4, 2), torch.empty(4, 2)
    if rank == 1:
        gave_up.wait(timeout_s + 3)   # alive, but never joins the exchange (until rank 0 gave up on it)
        results.put((1, "slept"))
        return
    results.put((0, _failing_a2a(dist, out, x)))
    gave_up.set()


def test_a_peer_that_never_joins_times_out_with_the_groups_timeout():
    gave_up = mp.get_context("spawn").Event()  # referenced here until the ranks are done with it
    procs, results = _spawn(_peer_absent_main, 2, 2.0, gave_up)
    msg, waited = _collect(procs, results)[0]
    assert "timed out after 2 s waiting for rank 1" in msg
    assert 2 <= waited < 6


def _fallback_main(rank: int, world: int, address: str, results):
    from maverick_ray.native.shm_exchange import SharedMemoryExchange

    if rank == 1:  # this rank cannot map the segment (as on another host)
        def refuse(*a, **k):
            raise OSError("no such segment here")
        SharedMemoryExchange.attach = refuse
    dist, pg = _init(rank, world, address)
    x = torch.arange(8.0).reshape(4, 2) + 10 * rank
    out = torch.empty(4, 2)
    dist.all_to_all_single(out, x)
    results.put((rank, (pg.shared_memory, pg.fallback_reason, out.tolist())))
    dist.destroy_process_group()


def _segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("maverick-ray-a2a-")}


def test_a_rank_that_cannot_map_the_segment_sends_every_rank_to_gloo():
    before = _segments()
    procs, results = _spawn(_fallback_main, 2)
    got = _collect(procs, results)
    for rank in (0, 1):
        shared, reason, out = got[rank]
        assert shared is False and "rank 1 could not map" in reason and "no such segment here" in reason
        assert out == [[4 * rank, 4 * rank + 1], [4 * rank + 2, 4 * rank + 3],
                       [10 + 4 * rank, 11 + 4 * rank], [12 + 4 * rank, 13 + 4 * rank]]
    assert _segments() <= before, "the group left its segment in /dev/shm"


def test_cpu_collectives_setting_is_validated_and_reaches_the_engine_config(tiny_ckpt):
    from maverick_ray.cli import build_parser, make_engine
    from maverick_ray.config import ConfigError, EngineConfig
    from maverick_ray.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="cpu_collectives"):
        EngineConfig(cpu_collectives="mpi")
    assert ServeSettings.from_args({"cpu_collectives": "gloo"}).engine().cpu_collectives == "gloo"
    for cmd in (["generate", "--prompt", "hi"], ["serve"]):
        assert build_parser().parse_args([*cmd, "--cpu-collectives", "gloo"]).cpu_collectives == "gloo"
        assert build_parser().parse_args(cmd).cpu_collectives == "auto"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*cmd, "--cpu-collectives", "mpi"])
    args = build_parser().parse_args(["generate", "--model", str(tiny_ckpt), "--prompt", "hi",
                                      "--cpu-collectives", "gloo"])
    engine, _ = make_engine(args)
    assert engine.engine_cfg.cpu_collectives == "gloo"
