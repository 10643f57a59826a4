"""The engine against the single-process model and transformers: EP = 1 in-process, EP = 2, 4 on Ray."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from maverick_ray.config import EngineConfig, ModelConfig, ParallelConfig
from maverick_ray.engine.engine import Engine
from maverick_ray.engine.request import EngineError
from maverick_ray.engine.sampling import SamplingParams

from engine_helpers import checkpoint_state, greedy_reference, prompts_for


_IMAGE_REFS: dict[tuple, list[int]] = {}


def image_reference(ckpt):
    """An image prompt and transformers' greedy continuation of it (computed once per session:
    the parametrized EP cases share it; the prompt and image inputs are made afresh each call)."""
    from maverick_ray.checkpoint.tokenizer import ChatTokenizer
    from maverick_ray.engine.multimodal import prepare_images_from_files

    from image_helpers import image_bytes

    path = ckpt.parent / "engine_img.png"
    path.write_bytes(image_bytes(110, 110, seed=5))
    ids, mm = prepare_images_from_files(ckpt, ChatTokenizer.from_pretrained(ckpt), [str(path)], "Describe.", 8)
    key = (str(ckpt), checkpoint_state(ckpt), tuple(ids), mm["pixel_values"].numpy().tobytes())
    if key not in _IMAGE_REFS:
        from transformers import Llama4ForConditionalGeneration

        hf = Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        with torch.no_grad():
            _IMAGE_REFS[key] = hf.generate(input_ids=torch.tensor([ids]), pixel_values=mm["pixel_values"],
                                           max_new_tokens=8, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)[0, len(ids):].tolist()
    return ids, mm, list(_IMAGE_REFS[key])


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run_all(engine: Engine, prompts, params=GREEDY):
    return [engine.generate(p, params)["token_ids"] for p in prompts]


def test_ep1_matches_single_process_model_and_transformers(tiny_ckpt):
    prompts = prompts_for(tiny_ckpt)
    ours_ref = greedy_reference(tiny_ckpt, prompts, 12, use_hf=False)
    hf_ref = greedy_reference(tiny_ckpt, prompts, 12, use_hf=True)
    assert ours_ref == hf_ref
    with Engine(tiny_ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=4, max_model_len=256)) as eng:
        assert run_all(eng, prompts) == hf_ref


@pytest.mark.parametrize("ep,collectives", [(2, "auto"), (4, "auto"), (2, "gloo")])
def test_expert_parallel_on_ray_matches_transformers(tiny_ckpt, ray_local, ep, collectives, capsys):
    prompts = prompts_for(tiny_ckpt)
    hf_ref = greedy_reference(tiny_ckpt, prompts, 12, use_hf=True)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    with Engine(tiny_ckpt, ParallelConfig(ep_size=ep),
                EngineConfig(max_num_seqs=4, max_model_len=256, cpu_collectives=collectives)) as eng:
        assert run_all(eng, prompts) == hf_ref
        infos = eng.ranks.call("info")
        # One host: the ranks' all-to-all goes through shared memory unless gloo is asked for.
        assert [i["collectives"] for i in infos] == [{"auto": "shared memory", "gloo": "gloo"}[collectives]] * ep
        owned = sorted(e for i in infos for e in i["experts"])
        assert owned == list(range(cfg.text.num_local_experts))
        per_rank = [i["routed_expert_bytes"] for i in infos]
        total = sum(per_rank)
        with capsys.disabled():
            print(f"\nEP={ep}: routed-expert bytes per rank {per_rank} (total {total}, "
                  f"fractions {[round(b / total, 3) for b in per_rank]})")
        for b in per_rank:
            assert abs(b / total - 1 / ep) < 0.02
        stats = eng.last_step
        assert len(stats.rank_received) == ep
        ids, mm, ref = image_reference(tiny_ckpt)
        got = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), mm_inputs=mm)
        assert got["token_ids"] == ref, "image prompt differs under expert parallelism"


def test_concurrent_requests_join_running_batches_and_match_alone(tiny_ckpt, ray_local):
    g = torch.Generator().manual_seed(3)
    vocab = ModelConfig.from_pretrained(tiny_ckpt).text.vocab_size
    prompts = [torch.randint(10, vocab - 50, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (32,), generator=g)]
    lengths = [int(n) for n in torch.randint(2, 20, (32,), generator=g)]
    with Engine(tiny_ckpt, ParallelConfig(ep_size=2), EngineConfig(max_num_seqs=8, max_model_len=256)) as eng:
        alone = [eng.generate(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))["token_ids"]
                 for p, n in zip(prompts[:32:4], lengths[:32:4])]
        joined = []
        eng.add_step_listener(lambda s: joined.append(s.joined_running_batch))
        results: dict[int, list[int]] = {}

        def client(i):
            time.sleep(0.01 * (i % 8))  # staggered arrivals
            out = eng.generate(prompts[i], SamplingParams(max_tokens=lengths[i], temperature=0, ignore_eos=True))
            results[i] = out["token_ids"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 32
        for k, i in enumerate(range(0, 32, 4)):
            assert results[i] == alone[k], f"request {i} differs when batched"
        for i in range(32):
            assert len(results[i]) == lengths[i]
        assert any(joined), "no request joined a batch that was already decoding"


def test_fail_stop_dead_worker_fails_requests_and_marks_engine_unhealthy(tiny_ckpt, ray_local):
    import ray

    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=2),
                 EngineConfig(max_num_seqs=4, max_model_len=512, step_timeout_s=20, max_recoveries=0)).start()
    try:
        streams = [eng.add_request(list(range(10, 20)), SamplingParams(max_tokens=400, temperature=0,
                                                                       ignore_eos=True)) for _ in range(3)]
        first = next(iter(streams[0]))
        assert first.token_id is not None
        ray.kill(eng.ranks.actors[1])
        t0 = time.monotonic()
        finals = []
        for s in streams:
            *_, last = list(s)
            finals.append(last)
        assert time.monotonic() - t0 < 30
        assert all(f.finish_reason == "error" and "engine failed" in f.error for f in finals)
        print("error seen by requests:", finals[0].error)
        # The error names the rank and carries Ray's own account of the death.
        assert "rank 1 failed" in finals[0].error and "ray.kill" in finals[0].error
        assert not eng.healthy
        with pytest.raises(EngineError, match="unhealthy"):
            eng.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("ep", [1, 2])
def test_fail_stop_raising_worker_fails_requests_with_its_error_and_marks_engine_unhealthy(tiny_ckpt, ray_local, ep):
    import ray

    eng = Engine(tiny_ckpt, ParallelConfig(ep_size=ep),
                 EngineConfig(max_num_seqs=4, max_model_len=512, step_timeout_s=20, max_recoveries=0), use_ray=ep > 1).start()
    try:
        streams = [eng.add_request(list(range(10, 20)), SamplingParams(max_tokens=400, temperature=0,
                                                                       ignore_eos=True)) for _ in range(3)]
        assert next(iter(streams[0])).token_id is not None
        if ep == 1:
            eng.ranks.call("fail_after", 2, "injected fault")
        else:  # one rank raises; its peer is left waiting in the collective it never joins
            ray.get(eng.ranks.actors[1].call.remote("fail_after", 2, "injected fault"))
        t0 = time.monotonic()
        finals = [list(s)[-1] for s in streams]
        assert time.monotonic() - t0 < 15  # at once, not after the step timeout
        rank = 0 if ep == 1 else 1
        for f in finals:
            assert f.finish_reason == "error" and "engine failed" in f.error and "injected fault" in f.error, f.error
            assert ep == 1 or f"rank {rank} failed" in f.error
        assert not eng.healthy
        with pytest.raises(EngineError, match="unhealthy"):
            eng.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()

