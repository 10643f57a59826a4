"""Settings of one maverick-ray Serve application, from the builder's `args` (Serve config YAML)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ConfigError, EngineConfig, ParallelConfig

API_KEY_ENV = "MAVERICK_RAY_API_KEY"


@dataclass
class ServeSettings:
    model: str | None = None             # checkpoint dir; None = the tiny checkpoint (created if missing)
    served_model_name: str | None = None  # name clients pass as `model`; default: the directory name
    ep_size: int = 2
    placement_strategy: str = "PACK"
    num_gpus_per_worker: float = 0
    num_cpus_per_worker: float = 1
    worker_resources: dict | None = None   # custom Ray resources per EP worker bundle
    dtype: str = "auto"
    cpu_kernels: str = "auto"             # native CPU kernels (routed experts, RMSNorm): auto | off
    cpu_collectives: str = "auto"         # CPU ranks' all-to-all: auto (shared memory on one host) | gloo
    max_model_len: int = 2048
    max_num_seqs: int = 32
    default_max_tokens: int = 256
    max_images: int = 8
    max_image_pixels: int = 16_000_000
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * 2**20
    api_key: str | None = None            # or the MAVERICK_RAY_API_KEY environment variable
    expert_metrics: str = "on"            # per-expert series: on | off | summary (max/min per layer)
    metrics_window_steps: int = 64        # steps in the routing-balance window
    enable_test_hooks: bool = False       # POST /v1/debug/force-expert (tests only)
    # Serve deployment options (also settable in the Serve config's `deployments:` section)
    num_replicas: int | str | None = None
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = 64
    replica_num_cpus: float = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        args = dict(args or {})
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"unknown application args {unknown}; known: {sorted(names)}")
        s = cls(**args)
        if s.api_key is None:
            s.api_key = os.environ.get(API_KEY_ENV) or None
        s.parallel()  # validate early
        s.engine()
        return s

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(ep_size=self.ep_size, placement_strategy=self.placement_strategy,
                              num_gpus_per_worker=self.num_gpus_per_worker,
                              num_cpus_per_worker=self.num_cpus_per_worker,
                              worker_resources=self.worker_resources)

    def engine(self) -> EngineConfig:
        return EngineConfig(max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len, dtype=self.dtype,
                            cpu_kernels=self.cpu_kernels, cpu_collectives=self.cpu_collectives)

    def placement_group_bundles(self) -> list[dict] | None:
        """The replica's own bundle plus one per EP worker (EP > 1 runs the workers as actors)."""
        if self.ep_size <= 1:
            return None
        return [{"CPU": self.replica_num_cpus}] + [self.parallel().worker_bundle()] * self.ep_size
