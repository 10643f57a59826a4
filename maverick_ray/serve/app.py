"""Ray Serve application: one replica = one expert-parallel engine behind a FastAPI ingress.

Use as a Serve import path: `import_path: maverick_ray.serve.app:build_app` with `args:`
from ServeSettings (see configs/). The replica's placement group holds the replica's own
bundle plus one bundle per EP worker, so Serve's autoscaler adds whole engines.

The routes are http_api's (plain functions, no Serve in them); here they serve the replica's
own MaverickServer, which Serve's replica context hands them.
"""


import logging
from pathlib import Path

from ray import serve

from .http_api import make_api
from .settings import ServeSettings

log = logging.getLogger(__name__)


def _replica_server() -> "MaverickServer":
    """The MaverickServer of the replica this request runs in (the routes' backend)."""
    return serve.get_replica_context().servable_object


api = make_api(_replica_server, echo_request_id=False)  # Serve's proxy echoes X-Request-ID itself


@serve.deployment(name="MaverickServer", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class MaverickServer:
    def __init__(self, settings: dict):
        from ..checkpoint.tokenizer import ChatTokenizer
        from ..checkpoint.writer import ensure_tiny_checkpoint
        from ..engine.engine import Engine
        from .openai_service import OpenAIService, image_prompt_builder

        self.settings = ServeSettings.from_args(settings)
        ckpt = Path(self.settings.model) if self.settings.model else ensure_tiny_checkpoint()
        self.tokenizer = ChatTokenizer.from_pretrained(ckpt, chat_template=self.settings.engine().chat_template or None)
        if not self.tokenizer.has_chat_template:
            log.warning("%s has no chat template and none was given (chat_template): chat requests get a 400, "
                        "completions work", ckpt)
        self.engine = Engine(ckpt, self.settings.parallel(), self.settings.engine(),
                             use_ray=self.settings.parallel().ep_size > 1, tokenizer=self.tokenizer).start()
        from ..metrics import EngineMetrics

        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica
            replica = "local"
        self.metrics = EngineMetrics(self.engine, replica, self.settings.expert_metrics,
                                     self.settings.metrics_window_steps)
        name = self.settings.served_model_name or ckpt.name
        self.service = OpenAIService(self.engine, self.tokenizer, self.settings, name,
                                     image_prompt_builder(ckpt, self.engine, self.tokenizer, self.settings))

    def check_health(self):
        if not self.engine.healthy:
            raise RuntimeError(f"engine unhealthy: {self.engine.error}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(args: "dict | None" = None) -> serve.Application:
    """Serve application builder (`import_path: maverick_ray.serve.app:build_app`)."""
    settings = ServeSettings.from_args(args)
    if settings.model and Path(settings.model).is_dir():
        # Checked where the app is built (the `serve run` terminal; `serve status` after `serve
        # deploy`), before any replica starts. A path absent here may exist on the workers only.
        from .startup import check_checkpoint

        check_checkpoint(settings.model, settings.engine().chat_template)
    options: dict = {"max_ongoing_requests": settings.max_ongoing_requests,
                     "max_queued_requests": settings.max_queued_requests,
                     "backpressure_config": {"retry_after_s": settings.retry_after_s},
                     "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
                     "graceful_shutdown_wait_loop_s": settings.graceful_shutdown_wait_loop_s,
                     "ray_actor_options": {"num_cpus": settings.replica_num_cpus}}
    bundles = settings.placement_group_bundles()
    if bundles:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = settings.parallel().placement_strategy
    if settings.autoscaling_config:
        options["autoscaling_config"] = settings.autoscaling_config
    elif settings.num_replicas is not None:
        options["num_replicas"] = settings.num_replicas
    return MaverickServer.options(**options).bind(dict(args or {}))
