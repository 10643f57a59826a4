"""Measured expert load: per MoE layer and per expert, the tokens routed over a window of steps.

The window itself is metrics.RoutingWindow, fed from each step's `StepStats.expert_counts`
(engine/engine.py); in serving, EngineMetrics keeps one (`metrics_window_steps`) and
`GET /v1/expert-load` returns its summary. `attach_window` feeds one from an engine without the
metrics (e.g. `maverick-ray generate` or a test). `ExpertLoad` is that window's load as a value
the policy (parallel/eplb.py) reads, and as a file: `maverick-ray record-load` writes it from a
running server, and the `init_expert_location` knob starts an engine from it.

File format (JSON):
    {"format": "maverick-ray/expert-load/1",
     "num_experts": E, "moe_layers": [layer index, ...], "window_steps": steps,
     "expert_load": [[tokens of expert 0, ..., expert E-1] for each MoE layer]}
The body of `GET /v1/expert-load` is accepted as it is (it has the same keys).

Shape legend: L MoE layers, E routed experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

FORMAT = "maverick-ray/expert-load/1"


class LoadFileError(ConfigError):
    """An expert-load file (the init_expert_location knob) or /v1/expert-load body that cannot be
    used: says what is wrong. A ConfigError, so the CLI and Serve start-up report it as one."""


@dataclass(frozen=True)
class ExpertLoad:
    tokens: tuple[tuple[int, ...], ...]   # (L, E) tokens routed to each expert of each MoE layer
    moe_layers: tuple[int, ...]           # (L,) the decoder layer of each row
    window_steps: int                     # engine steps the tokens were counted over

    @property
    def num_experts(self) -> int:
        return len(self.tokens[0])

    def per_expert(self) -> list[int]:
        """(E,) tokens summed over the MoE layers: what one placement for every layer balances."""
        return [sum(col) for col in zip(*self.tokens)]

    def merged(self, other: "ExpertLoad") -> "ExpertLoad":
        """Two windows' tokens added (e.g. snapshots taken a window apart)."""
        if (other.moe_layers, other.num_experts) != (self.moe_layers, self.num_experts):
            raise LoadFileError("cannot add loads of different models: MoE layers "
                                f"{list(self.moe_layers)} x {self.num_experts} experts vs "
                                f"{list(other.moe_layers)} x {other.num_experts}")
        rows = tuple(tuple(a + b for a, b in zip(ra, rb)) for ra, rb in zip(self.tokens, other.tokens))
        return ExpertLoad(rows, self.moe_layers, self.window_steps + other.window_steps)

    @classmethod
    def from_summary(cls, d: dict, where: str = "expert load") -> "ExpertLoad":
        """From RoutingWindow.summary() plus `moe_layers`, the /v1/expert-load body, or a file's JSON."""
        if not isinstance(d, dict):
            raise LoadFileError(f"{where}: expected a JSON object with 'expert_load', got {type(d).__name__}")
        fmt = d.get("format")
        if fmt is not None and fmt != FORMAT:
            raise LoadFileError(f"{where}: format {fmt!r} is not {FORMAT!r}")
        rows = d.get("expert_load")
        if not isinstance(rows, list) or not rows:
            raise LoadFileError(f"{where}: 'expert_load' must be a non-empty list (one list of per-expert tokens "
                                "per MoE layer); an empty one means no routed tokens were recorded yet")
        width = len(rows[0]) if isinstance(rows[0], list) else -1
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == width and width > 0
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in row)):
                raise LoadFileError(f"{where}: expert_load[{i}] must be a list of non-negative integers, one per "
                                    f"expert ({width if width > 0 else 'at least 1'}, as layer 0 lists)")
        n = d.get("num_experts", width)
        if n != width:
            raise LoadFileError(f"{where}: num_experts is {n!r} but each layer lists {width} experts")
        layers = d.get("moe_layers", list(range(len(rows))))
        if not (isinstance(layers, list) and len(layers) == len(rows) and all(isinstance(x, int) for x in layers)):
            raise LoadFileError(f"{where}: moe_layers must list one layer index per expert_load row ({len(rows)})")
        steps = d.get("window_steps", 0)
        if not (isinstance(steps, int) and steps >= 0):
            raise LoadFileError(f"{where}: window_steps must be a non-negative integer, got {steps!r}")
        if not any(any(row) for row in rows):
            raise LoadFileError(f"{where}: records no routed tokens (send traffic before recording)")
        return cls(tuple(tuple(row) for row in rows), tuple(layers), steps)

    def to_json(self) -> dict:
        return {"format": FORMAT, "num_experts": self.num_experts, "moe_layers": list(self.moe_layers),
                "window_steps": self.window_steps, "expert_load": [list(row) for row in self.tokens]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ExpertLoad":
        """Reads an expert-load file; LoadFileError names the file and what is wrong with it."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise LoadFileError(f"expert-load file {p}: cannot be read ({e.strerror or e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoadFileError(f"expert-load file {p}: not valid JSON ({e})") from None
        return cls.from_summary(data, where=f"expert-load file {p}")


def attach_window(engine, steps: int = 64):
    """A metrics.RoutingWindow over the engine's last `steps` steps, fed by a step listener."""
    from ..metrics import RoutingWindow

    window = RoutingWindow(steps)
    engine.add_step_listener(lambda s: window.add(s.expert_counts, s.rank_received))
    return window


def load_of_window(window, moe_layers) -> ExpertLoad:
    """The window's tokens per layer and expert (LoadFileError when it saw none yet)."""
    summary = window.summary()
    return ExpertLoad.from_summary(dict(summary, moe_layers=list(moe_layers)[:summary["layers"]]),
                                   where="routing window")
