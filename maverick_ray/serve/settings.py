"""Settings of one maverick-ray Serve application, from the builder's `args` (Serve config YAML).

The args are flat: every engine and parallel knob (`EngineConfig`, `ParallelConfig` in
config.py, where each is declared with its help text) plus the serving settings below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ConfigError, EngineConfig, ParallelConfig
from ..knobs import knobs

API_KEY_ENV = "MAVERICK_RAY_API_KEY"
SERVE_DEFAULTS = {"ep_size": 2}  # a server runs expert parallelism by default; `generate` runs EP = 1


@dataclass
class ServeSettings:
    model: str | None = None             # checkpoint dir; None = the tiny checkpoint (created if missing)
    served_model_name: str | None = None  # name clients pass as `model`; default: the directory name
    default_max_tokens: int = 256
    max_images: int = 8
    max_image_pixels: int = 16_000_000
    allow_remote_images: bool = False
    max_request_bytes: int = 20 * 2**20
    api_key: str | None = None            # or the MAVERICK_RAY_API_KEY environment variable
    # With an API key: GET /dashboard and its data (GET /v1/expert-load) need no key (serve/auth.py)
    dashboard_public: bool = False
    # CORS (serve/cors.py), off by default: the origins browsers may call from ("*" for any)
    cors_allow_origins: list[str] | None = None
    cors_allow_headers: list[str] = field(default_factory=lambda: ["*"])  # request headers they may send
    cors_allow_credentials: bool = False  # cookies / HTTP auth on cross-origin calls (needs listed origins)
    expert_metrics: str = "on"            # per-expert series: on | off | summary (max/min per layer)
    metrics_window_steps: int = 64        # steps in the routing-balance window
    enable_test_hooks: bool = False       # POST /v1/debug/force-expert (tests only)
    # Serve deployment options (also settable in the Serve config's `deployments:` section)
    num_replicas: int | str | None = None
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = 64
    # Requests each Serve proxy (or handle) queues for this deployment while every replica has
    # max_ongoing_requests; past it Serve answers 503 with Retry-After: retry_after_s. -1: no limit.
    max_queued_requests: int = 128
    retry_after_s: float = 5.0            # Retry-After of every 503 (Serve's full queue and the engine's)
    graceful_shutdown_timeout_s: float = 20.0   # a stopping replica waits this long for ongoing requests
    graceful_shutdown_wait_loop_s: float = 2.0  # ... checking this often whether they are done
    replica_num_cpus: float = 1
    # The engine's and the EP group's knobs, built from the same flat args.
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    parallel_config: ParallelConfig = field(default_factory=lambda: ParallelConfig(**SERVE_DEFAULTS))

    def __post_init__(self):
        for name in ("cors_allow_origins", "cors_allow_headers"):
            value = getattr(self, name)
            if isinstance(value, str):  # one origin, or several separated by commas
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(self, name, value)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        if self.cors_allow_credentials and "*" in (self.cors_allow_origins or []):
            raise ConfigError("cors_allow_credentials needs the allowed origins listed, not '*'")
        for name in ("dashboard_public", "cors_allow_credentials"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @staticmethod
    def own_names() -> set[str]:
        return {f.name for f in fields(ServeSettings)} - {"engine_config", "parallel_config"}

    @staticmethod
    def knob_names() -> set[str]:
        """The engine and parallel knobs the args accept (each config's own fields)."""
        return {f.name for cls in (EngineConfig, ParallelConfig) for f in knobs(cls)}

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """Validates the args (unknown names and bad values raise ConfigError)."""
        args = dict(args or {})
        known = cls.own_names() | cls.knob_names()
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown application args {unknown}; known: {sorted(known)}")
        pick = lambda cfg: {f.name: args.pop(f.name) for f in knobs(cfg) if f.name in args}  # noqa: E731
        engine = EngineConfig(**pick(EngineConfig))
        parallel = ParallelConfig(**{**SERVE_DEFAULTS, **pick(ParallelConfig)})
        s = cls(**args, engine_config=engine, parallel_config=parallel)
        if s.api_key is None:
            s.api_key = os.environ.get(API_KEY_ENV) or None
        if s.api_key is not None and not (isinstance(s.api_key, str) and s.api_key.isascii()
                                          and s.api_key.isprintable() and " " not in s.api_key):
            raise ConfigError("api_key must be printable ASCII without spaces (it travels in an HTTP header)")
        return s

    def parallel(self) -> ParallelConfig:
        return self.parallel_config

    def engine(self) -> EngineConfig:
        return self.engine_config

    def placement_group_bundles(self) -> list[dict] | None:
        """The replica's own bundle plus one per EP worker (EP > 1 runs the workers as actors)."""
        if self.parallel_config.ep_size <= 1:
            return None
        return [{"CPU": self.replica_num_cpus}] + [self.parallel_config.worker_bundle()] * self.parallel_config.ep_size
