"""How long one engine step may take before its ranks count as hung.

A fixed timeout either fires on a slow but healthy prefill or leaves a hung rank undetected
for minutes. The deadline follows the measured steps instead:

    deadline = clamp(factor * max(p99 step seconds, p99 seconds-per-token * this step's tokens),
                     floor_s, ceiling_s)

over a window of recent steps, so a long prefill gets a deadline in proportion to its tokens
and a decode step one in proportion to recent decode steps. Until `warmup_steps` steps have
been measured (the first steps include one-time costs) the deadline is `ceiling_s`.
"""

from __future__ import annotations

from collections import deque


def _p99(values) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class StepDeadline:
    def __init__(self, factor: float, floor_s: float, ceiling_s: float, window: int = 256,
                 warmup_steps: int = 8):
        self.factor, self.floor_s, self.ceiling_s = factor, min(floor_s, ceiling_s), ceiling_s
        self.warmup_steps = warmup_steps
        self._seconds: deque[float] = deque(maxlen=window)
        self._per_token: deque[float] = deque(maxlen=window)

    def record(self, seconds: float, tokens: int) -> None:
        """A finished step: its wall time and the most tokens any rank ran in it."""
        self._seconds.append(seconds)
        self._per_token.append(seconds / max(tokens, 1))

    def for_step(self, tokens: int) -> float:
        """The deadline in seconds for a step whose busiest rank runs `tokens` tokens."""
        if len(self._seconds) < self.warmup_steps:
            return self.ceiling_s
        expected = max(_p99(self._seconds), _p99(self._per_token) * tokens)
        return min(max(self.factor * expected, self.floor_s), self.ceiling_s)
