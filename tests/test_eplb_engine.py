"""Redundant experts and a recorded-load start through the real engine at EP = 2 on Ray: greedy
output identical to EP = 1, a hot expert's tokens split over its copies, and a deployment
started from the load recorded under a skewed router balanced from its first step."""

from __future__ import annotations

import time

import pytest

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.sampling import SamplingParams
from maverick_ray.parallel.eplb import place
from maverick_ray.parallel.expert_load import ExpertLoad, attach_window, load_of_window
from maverick_ray.parallel.placement import ExpertPlacement

from engine_helpers import prompts_for

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
CFG = EngineConfig(max_num_seqs=4, max_model_len=256)
HOT = 5   # on rank 0 of the contiguous layout (experts 0..7 of 16), with no copy


def run_all(engine, prompts):
    return [engine.generate(p, GREEDY)["token_ids"] for p in prompts]


def balancedness(steps) -> float:
    """Mean over max of the tokens each rank's experts received, summed over steps and layers."""
    per_rank = [sum(sum(s.rank_received[r]) for s in steps) for r in range(len(steps[0].rank_received))]
    return sum(per_rank) / len(per_rank) / max(per_rank)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), CFG) as eng:
        return run_all(eng, prompts_for(tiny_ckpt))


@pytest.fixture(scope="module")
def recorded(tiny_ckpt, ray_local, reference, tmp_path_factory):
    """EP = 2 with 2 redundant slots (experts 0 and 1 copied): the checks of that engine, then the
    load of traffic routed to HOT recorded to a file, and how balanced that traffic was."""
    E = ModelConfig.from_pretrained(tiny_ckpt).text.num_local_experts
    prompts = prompts_for(tiny_ckpt)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=2, redundant_experts=2), CFG) as eng:
        assert run_all(eng, prompts) == reference
        infos = eng.ranks.call("info")
        assert [i["experts"] for i in infos] == [list(range(9)), list(range(9, 16)) + [0, 1]]
        assert infos[0]["routed_expert_bytes"] == infos[1]["routed_expert_bytes"]
        steps = []
        eng.add_step_listener(steps.append)
        eng.force_expert(0)           # expert 0 has a copy on each rank
        eng.generate(prompts[1], GREEDY)
        settle(eng, steps)
        spread = balancedness(steps)
        eng.force_expert(HOT)
        window = attach_window(eng, steps=1000)
        marks: list = []
        eng.add_step_listener(marks.append)   # after the window's listener
        steps.clear()
        for p in prompts:
            eng.generate(p, GREEDY)
        settle(eng, marks)
        skewed = balancedness(steps)
        load = load_of_window(window, eng.model_config.text.moe_layers)
        eng.force_expert(None)
    path = tmp_path_factory.mktemp("load") / "load.json"
    load.save(path)
    return {"path": path, "E": E, "spread": spread, "skewed": skewed,
            "tokens": sum(s.num_tokens for s in steps), "moe_layers": len(steps[0].expert_counts)}


def settle(eng, seen: list) -> None:
    """generate() returns on its last token, before the engine loop runs that step's listeners:
    waits until `seen` (filled by the last listener registered) has the loop's latest step."""
    deadline = time.monotonic() + 30
    while not (seen and seen[-1].step >= eng.step_count) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen and seen[-1].step >= eng.step_count, "the step listeners did not catch up in 30 s"


def test_redundant_copies_give_identical_output_and_share_a_hot_experts_tokens(recorded):
    # (identical greedy output and the slot layout are asserted in the fixture)
    assert recorded["spread"] >= 0.9, "expert 0's tokens were not split over its two copies"
    assert recorded["skewed"] == 0.5, "all tokens forced to one uncopied expert should land on one rank"


def test_recorded_load_counts_every_routed_token(recorded):
    load = ExpertLoad.load(recorded["path"])
    per_expert = load.per_expert()
    assert per_expert[HOT] == recorded["tokens"] * recorded["moe_layers"] == sum(per_expert)


def test_engine_started_from_the_recorded_load_is_balanced_and_identical(tiny_ckpt, ray_local, reference, recorded):
    load = ExpertLoad.load(recorded["path"]).per_expert()
    planned = place(load, 2, 9)
    contiguous = ExpertPlacement.contiguous(recorded["E"], 2)
    assert max(planned.rank_loads(load)) == max(contiguous.rank_loads(load)) / 2   # HOT split over 2 copies
    parallel = ParallelConfig(ep_size=2, redundant_experts=2, init_expert_location=str(recorded["path"]))
    with Engine(tiny_ckpt, parallel, CFG) as eng:
        assert eng.ranks.placement == planned
        assert [i["experts"] for i in eng.ranks.call("info")] == [list(s) for s in planned.slots]
        steps = []
        eng.add_step_listener(steps.append)
        eng.force_expert(HOT)
        for p in prompts_for(tiny_ckpt):
            eng.generate(p, GREEDY)
        # From the first step (a 5-token prefill: 3 and 2 rows per layer), and over the whole traffic.
        first = steps[0].rank_received
        assert all(abs(a - b) <= 1 for a, b in zip(*first)) and sum(map(sum, first)) > 0, first
        assert balancedness(steps) >= 0.9, "the same traffic is not balanced"
        eng.force_expert(None)
        assert run_all(eng, prompts_for(tiny_ckpt)) == reference
