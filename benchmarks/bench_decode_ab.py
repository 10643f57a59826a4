"""Decode speed of this checkout against another one (e.g. the commit before a change), EP = 1.

Usage: .venv/bin/python benchmarks/bench_decode_ab.py CHECKOUT CHECKPOINT PROMPT_LEN [SEQS] [NEW_TOKENS]
Prints one line for the checkout whose package comes first on sys.path (CHECKOUT): SEQS (default
32) greedy requests of PROMPT_LEN tokens, NEW_TOKENS (default 64) new tokens each, 5 passes after
a warm-up: median decode tokens/s over the passes, and the median over passes of each pass's
median decode step (the engine loop's interval between two decode-only steps: robust to a stall
that a pass's wall time would absorb). Run it alternately for two checkouts (a `git worktree`
of the old commit, and this one), in the same session, and compare the lines.
"""

import random
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
from maverick_ray.config import EngineConfig, ParallelConfig  # noqa: E402
from maverick_ray.engine.engine import Engine  # noqa: E402
from maverick_ray.engine.sampling import SamplingParams  # noqa: E402

ckpt, plen = sys.argv[2], int(sys.argv[3])
seqs = int(sys.argv[4]) if len(sys.argv) > 4 else 32
new = int(sys.argv[5]) if len(sys.argv) > 5 else 64
rng = random.Random(0)
prompts = [[rng.randrange(10, 600) for _ in range(plen)] for _ in range(seqs)]
with Engine(ckpt, ParallelConfig(ep_size=1), EngineConfig(max_num_seqs=seqs, max_model_len=plen + new + 8)) as eng:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    eng.generate(prompts[0][:8], SamplingParams(max_tokens=4, temperature=0))
    marks: list = []
    eng.add_step_listener(lambda s: marks.append((s, time.perf_counter())))
    rates, steps = [], []
    for _ in range(5):
        marks.clear()
        streams = [eng.add_request(p, params) for p in prompts]
        t0 = next(time.perf_counter() for ev in streams[0] if ev.token_id is not None)  # prefill done
        for st in streams:
            for _ in st:
                pass
        rates.append(seqs * (new - 1) / (time.perf_counter() - t0))
        full = [i for i, (s, _) in enumerate(marks) if s.admitted == 0 and s.num_seqs == seqs]
        gaps = [marks[i][1] - marks[i - 1][1] for i in full if i - 1 in full]
        if gaps:
            steps.append(statistics.median(gaps))
step = f", decode step {1e3 * statistics.median(steps):.2f} ms" if steps else ""
print(f"{sys.argv[1]} prompt {plen}, {seqs} sequence(s): decode {statistics.median(rates):.0f} tok/s{step}")
