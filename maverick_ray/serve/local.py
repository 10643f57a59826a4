"""`maverick-ray serve`: start (or join) Ray, deploy the app, print how to call it, wait."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path


def deploy(args) -> str:
    """Starts Ray/Serve as asked by the CLI args and deploys; returns the base URL."""
    from ray import serve

    from ..checkpoint.writer import ensure_tiny_checkpoint
    from ..ray_runtime import init_ray
    from .app import build_app
    from .startup import check_checkpoint, run_app

    model = str(Path(args.model)) if args.model else str(ensure_tiny_checkpoint())
    check_checkpoint(model, args.chat_template)  # before Ray starts: a bad checkpoint fails here, with its cause
    init_ray(args.address, num_cpus=max(os.cpu_count() or 1, args.ep_size * args.replicas + 2),
             metrics_port=args.metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    app_args = app_args_from_cli(args, model)
    run_app(build_app(app_args), "maverick")
    return f"http://{args.host}:{args.port}"


def app_args_from_cli(args, model: str) -> dict:
    """The Serve app's args from `maverick-ray serve` flags: every engine and parallel knob."""
    from ..config import EngineConfig, ParallelConfig
    from ..knobs import as_dict, from_arguments

    app_args = {"model": model, "num_replicas": args.replicas,
                **as_dict(from_arguments(ParallelConfig, args)), **as_dict(from_arguments(EngineConfig, args))}
    if args.served_model_name:
        app_args["served_model_name"] = args.served_model_name
    if args.api_key:
        app_args["api_key"] = args.api_key
    return app_args


def serve_forever(args) -> int:
    print("maverick-ray: starting Ray and deploying (first start loads the checkpoint)...", file=sys.stderr, flush=True)
    from .startup import DeployError

    try:
        url = deploy(args)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _stop_ray(own_cluster=not args.address)  # on a joined cluster the failed app stays for `serve status`
        return 1
    # SIGTERM stops the server cleanly once it is up. Installed here, after ray.init installed its
    # own (sys.exit from the signal), and before the ready line: installed after that line, a
    # SIGTERM sent on reading it could still take Ray's path, which once left the process hanging
    # on its threads for over a minute (CI).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    name = args.served_model_name or (Path(args.model).name if args.model else "tiny")
    auth = ' -H "Authorization: Bearer $MAVERICK_RAY_API_KEY"' if args.api_key else ""
    print(f"maverick-ray ready: {url}/v1 (model '{name}', EP={args.ep_size}, replicas={args.replicas})", flush=True)
    print(f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
          f"\"max_tokens\": 16}}'", flush=True)
    if not args.address:
        print(f"  metrics: http://127.0.0.1:{args.metrics_port}/metrics   dashboard: {url}/dashboard", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("maverick-ray: shutting down", file=sys.stderr, flush=True)
    _stop_ray()
    return 0


def _stop_ray(own_cluster: bool = True) -> None:
    import ray
    from ray import serve

    if own_cluster:
        serve.shutdown()
    ray.shutdown()
