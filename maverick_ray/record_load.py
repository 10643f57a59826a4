"""`maverick-ray record-load`: save a running deployment's expert load for the next start.

Reads `GET /v1/expert-load` (the metrics' routing window: tokens per MoE layer and expert over
the last `window_steps` steps) and writes it as an expert-load file (parallel/expert_load.py),
which `--init-expert-location FILE` (or the Serve arg `init_expert_location`) turns into the
balanced starting placement. With several samples the windows are added up, each taken once
the engine has run a whole window of new steps, so no step is counted twice.
"""

from __future__ import annotations

import sys
import time

from .parallel.expert_load import ExpertLoad, LoadFileError
from .top import fetch


def record(url: str, samples: int = 1, interval: float = 5.0, api_key: str | None = None,
           log=None) -> ExpertLoad:
    """The load of `samples` non-overlapping windows of the deployment at `url`."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    total, last_step = None, None
    while True:
        body = fetch(url, api_key)
        step = body.get("stats", {}).get("steps")
        if last_step is None or step is None or step - last_step >= (total.window_steps if total else 0):
            load = ExpertLoad.from_summary(body, where=f"{url}/v1/expert-load")
            total = load if total is None else total.merged(load)
            last_step = step
            samples -= 1
            if log:
                log(f"sample taken: {load.window_steps} steps, {sum(load.per_expert())} routed tokens")
        if samples == 0:
            return total
        time.sleep(interval)


def run(url: str, out: str, samples: int, interval: float, api_key: str | None = None) -> int:
    try:
        load = record(url, samples, interval, api_key, log=lambda m: print(m, file=sys.stderr))
    except OSError as e:
        print(f"error: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    except LoadFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load.save(out)
    per = load.per_expert()
    busiest = sorted(range(len(per)), key=lambda e: -per[e])[:4]
    print(f"wrote {out}: {len(load.moe_layers)} MoE layers x {load.num_experts} experts over "
          f"{load.window_steps} steps; busiest experts {busiest}")
    return 0
