"""Ray Serve application: one replica = one expert-parallel engine behind a FastAPI ingress.

Use as a Serve import path: `import_path: maverick_ray.serve.app:build_app` with `args:`
from ServeSettings (see configs/). The replica's placement group holds the replica's own
bundle plus one bundle per EP worker, so Serve's autoscaler adds whole engines.
"""


import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from .errors import APIError, error_body
from .settings import ServeSettings

log = logging.getLogger(__name__)

api = FastAPI(title="maverick-ray", description="OpenAI-compatible Llama 4 MoE serving on Ray")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error")
    return JSONResponse(status_code=500, content=error_body(f"internal error: {type(exc).__name__}", "server_error"))


def _prompt_builder(ckpt: Path, engine, tokenizer, settings: ServeSettings):
    """(messages) -> (prompt ids, image inputs) for checkpoints with a vision tower, else None."""
    if not engine.model_config.is_multimodal:
        return None
    from .errors import bad_request

    def build(messages):
        from ..multimodal.images import ImageError
        from ..multimodal.prompt import chat_prompt_with_images

        try:
            return chat_prompt_with_images(messages, tokenizer, engine.model_config, ckpt,
                                           max_images=settings.max_images,
                                           allow_remote=settings.allow_remote_images,
                                           max_pixels=settings.max_image_pixels)
        except ImageError as e:
            raise bad_request(str(e), "messages", "invalid_image") from None
    return build


@serve.deployment(name="MaverickServer", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class MaverickServer:
    def __init__(self, settings: dict):
        from ..checkpoint.chat import Llama4Tokenizer
        from ..checkpoint.writer import ensure_tiny_checkpoint
        from ..engine.engine import Engine
        from .openai_service import OpenAIService

        self.settings = ServeSettings.from_args(settings)
        ckpt = Path(self.settings.model) if self.settings.model else ensure_tiny_checkpoint()
        self.tokenizer = Llama4Tokenizer.from_pretrained(ckpt)
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
                                     _prompt_builder(ckpt, self.engine, self.tokenizer, self.settings))

    def check_health(self):
        if not self.engine.healthy:
            raise RuntimeError(f"engine unhealthy: {self.engine.error}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    @api.get("/health")
    async def health(self):
        if not self.engine.healthy:
            return JSONResponse(status_code=503, content={"status": "unhealthy", "error": self.engine.error})
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.service.check_auth(request)
        return self.service.models()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.service.chat(request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.service.completions(request)

    @api.get("/v1/engine/stats")
    async def engine_stats(self):
        return self.engine.stats()

    @api.get("/v1/expert-load")
    async def expert_load(self):
        """Routing load over the recent window: per-expert heatmap, per-rank load, balancedness."""
        return self.metrics.expert_load()

    @api.get("/dashboard")
    async def dashboard(self):
        from fastapi.responses import HTMLResponse

        from .dashboard import DASHBOARD_HTML

        return HTMLResponse(DASHBOARD_HTML)

    @api.post("/v1/debug/force-expert")
    async def force_expert(self, request: Request):
        if not self.settings.enable_test_hooks:
            raise APIError(404, "test hooks are disabled", "invalid_request_error")
        expert = (await request.json()).get("expert")
        self.engine.force_expert(expert)
        self.metrics.window.steps.clear()
        return {"expert": expert}


def build_app(args: "dict | None" = None) -> serve.Application:
    """Serve application builder (`import_path: maverick_ray.serve.app:build_app`)."""
    settings = ServeSettings.from_args(args)
    options: dict = {"max_ongoing_requests": settings.max_ongoing_requests,
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
