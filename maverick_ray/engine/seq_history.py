"""What a rank needs to rebuild a sequence's sampling state: `SeqWork.history`.

Penalties, min_tokens and structured output read the tokens a sequence holds, with the prompt
kept apart from the produced tokens (engine/logits_processors.py). A rank sees only the tokens it
runs: not a prefix found in the prefix cache, and not which part of a replayed context (prompt +
produced tokens, after a rank failure or a preemption) was produced. So the engine attaches
(prompt ids, produced ids) to the sampling prefill step of each such sequence, every time it is
admitted; after that the rank follows the sequence by its decode inputs.
"""

from __future__ import annotations

from .request import Request
from .step_types import RankPlan


def attach_history(plans: list[RankPlan], requests: dict[str, Request]) -> None:
    """Sets `history` on every sampling prefill work item whose request needs it (engine
    thread, under the engine's lock, right after Scheduler.plan)."""
    for plan in plans:
        for w in plan.work:
            if w.params is None or not w.sample or not w.params.needs_history:
                continue
            req = requests.get(w.seq_id)
            if req is not None:
                w.history = (list(req.prompt_ids), list(req.output_ids))
