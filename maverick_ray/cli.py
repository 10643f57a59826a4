"""maverick-ray command line: generate | make-checkpoint | serve | top | record-load | plan.

Every subcommand works with no checkpoint argument: the tiny checkpoint is created on first
use in the user cache directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """--model, --address and every engine and parallel knob (declared in config.py)."""
    from .config import EngineConfig, ParallelConfig
    from .knobs import add_arguments

    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory in the Hugging Face Llama 4 layout "
                        "(default: the tiny checkpoint, created on first use in ~/.cache/maverick-ray)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: start a local Ray bound to 127.0.0.1)")
    add_arguments(p, ParallelConfig, defaults)
    add_arguments(p, EngineConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maverick-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt",
                       description="Generate a completion for one prompt (chat template applied to --prompt).")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="user message; the chat template is applied")
    src.add_argument("--token-ids", default=None, metavar="1,2,3",
                     help="raw prompt token ids (works on a checkpoint without tokenizer files)")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file to put before the prompt text (repeatable)")
    g.add_argument("--max-images", type=int, default=8, help="most images accepted per prompt (default: 8)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible per request)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')

    m = sub.add_parser("make-checkpoint", help="write a deterministic random checkpoint",
                       description="Write a random Llama 4 checkpoint in the Hugging Face layout "
                                   "(config, safetensors, tokenizer), loadable by transformers.")
    m.add_argument("out", metavar="OUT", help="output directory")
    m.add_argument("--preset", default="tiny", choices=["tiny", "mini"],
                   help="tiny: tests and try-outs (with a small vision tower); mini: benchmarks (hidden 512, 128 experts)")
    m.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    m.add_argument("--experts-layout", default="fused", choices=["fused", "split"],
                   help="fused experts.gate_up_proj (HF default) or split experts.{i}.*_proj.weight")
    m.add_argument("--max-shard-mb", type=float, default=2048.0, help="shard safetensors above this size (MB)")
    m.add_argument("--fp8", action="store_true",
                   help="routed experts in FP8 through compressed-tensors, as the official FP8 release "
                        "(experts split, per-channel scales, quantization_config in config.json)")
    m.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API on a local or existing Ray cluster",
                       description="Start (or join) Ray, deploy maverick-ray with Ray Serve and serve the "
                                   "OpenAI-compatible API until interrupted.")
    _add_model_args(s, {"ep_size": 2})
    s.add_argument("--replicas", type=int, default=1, help="Serve replicas (each one a whole EP engine)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    s.add_argument("--metrics-port", type=int, default=8080,
                   help="Prometheus metrics export port of the local Ray node (default: 8080)")
    s.add_argument("--served-model-name", default=None, help="model name clients send (default: the directory name)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or set MAVERICK_RAY_API_KEY)")

    t = sub.add_parser("top", help="live expert-load view of a running deployment in the terminal",
                       description="Show routing balance per MoE layer and per rank of a running deployment.")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="Serve endpoint (default: http://127.0.0.1:8000)")
    t.add_argument("--interval", type=float, default=2.0, help="refresh seconds (default: 2)")
    t.add_argument("--once", action="store_true", help="print one snapshot and exit")
    t.add_argument("--api-key", default=None, help="API key, when the server requires one")

    rl = sub.add_parser("record-load", help="save a running deployment's expert load, to start the next one balanced",
                        description="Write the routing load of a running deployment (GET /v1/expert-load: tokens per "
                                    "MoE layer and expert over the metrics window) to a file; start the next "
                                    "deployment with --init-expert-location FILE to begin with the placement the "
                                    "EPLB policy computes from it.")
    rl.add_argument("url", nargs="?", default="http://127.0.0.1:8000",
                    help="Serve endpoint (default: http://127.0.0.1:8000)")
    rl.add_argument("--out", required=True, metavar="FILE", help="expert-load file to write (JSON)")
    rl.add_argument("--samples", type=int, default=1,
                    help="windows to add up, each taken after a whole window of new steps (default: 1)")
    rl.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default: 5)")
    rl.add_argument("--api-key", default=None, help="API key, when the server requires one")

    pl = sub.add_parser(
        "plan", help="size a deployment: per-GPU memory, KV budget, fit verdict, Serve and KubeRay values",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Size one engine (one Serve replica) of a Llama 4 model on a GPU cluster: per rank, the\n"
                    "dense weights every rank holds, its routed-expert shard, the vision tower, activations,\n"
                    "the KV cache left and the sequences that fit; then the verdict and the Serve / KubeRay\n"
                    "values. Nothing is loaded: only config.json is read. Exit status 0 when it fits, 1 when not.",
        epilog="examples:\n"
               "  maverick-ray plan maverick --gpus 8 --gpu-memory 141              # bf16 on 8 x H200\n"
               "  maverick-ray plan maverick --nodes 2 --gpus 8 --gpu-memory 80     # bf16 on 2 x 8 x H100\n"
               "  maverick-ray plan maverick-fp8 --gpus 8 --gpu-memory 80 --json    # the FP8 release\n"
               "  maverick-ray plan /models/Llama-4-Scout-17B-16E-Instruct --gpus 4 --max-model-len 32768")
    pl.add_argument("model", metavar="CONFIG",
                    help="config.json, a checkpoint directory, or a model in configs/models: maverick, "
                         "maverick-fp8, scout (or a file name there)")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs per node (default: 8)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes one engine spans (default: 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                    help="memory of one GPU as the card is sold: 80 for H100, 141 for H200 (taken as GiB, which "
                         "is what those cards hold; default: 80)")
    pl.add_argument("--ep", type=int, default=None, help="expert-parallel ranks, one per GPU (default: every GPU)")
    pl.add_argument("--dtype", choices=("bf16", "fp8"), default=None,
                    help="weight format (default: fp8 when config.json has a quantization_config, else bf16)")
    pl.add_argument("--max-model-len", type=int, default=8192,
                    help="tokens of one sequence, prompt + output (default: 8192)")
    pl.add_argument("--max-num-seqs", type=int, default=None,
                    help="sequences per rank to check (default: report as many as fit)")
    pl.add_argument("--max-prefill-tokens", type=int, default=4096,
                    help="prompt tokens admitted per rank per step (default: 4096, the engine's default)")
    pl.add_argument("--kv-block-size", type=int, default=16,
                    help="tokens per KV cache page, the engine's kv_block_size (default: 16)")
    pl.add_argument("--text-only", action="store_true",
                    help="no image prompts (Serve max_images: 0): the vision tower is never loaded")
    pl.add_argument("--overhead-gb", type=float, default=3.0,
                    help="GiB per GPU kept for what the card reports less than its label, the CUDA context, "
                         "NCCL buffers and allocator slack (default: 3)")
    pl.add_argument("--cpus-per-worker", type=float, default=4, help="CPUs per EP worker bundle (default: 4)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    return parser


def _checkpoint(path: str | None) -> Path:
    from .checkpoint.writer import ensure_tiny_checkpoint

    return Path(path) if path else ensure_tiny_checkpoint()


def make_engine(args, tokenizer=None, progress: bool = True):
    from .config import EngineConfig, ParallelConfig
    from .engine.engine import Engine
    from .knobs import from_arguments
    from .ray_runtime import init_ray

    ckpt = _checkpoint(args.model)
    parallel = from_arguments(ParallelConfig, args)
    engine_cfg = from_arguments(EngineConfig, args)
    if parallel.ep_size > 1:
        init_ray(args.address, num_cpus=max(os.cpu_count() or 1, parallel.ep_size + 1))
    return Engine(ckpt, parallel, engine_cfg, progress=progress, tokenizer=tokenizer), ckpt


def cmd_generate(args) -> int:
    from .engine.sampling import InvalidRequest, SamplingParams

    ckpt = _checkpoint(args.model)
    args.model = str(ckpt)
    tokenizer = None
    if args.token_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            print(f"error: --token-ids must be comma-separated integers, got {args.token_ids!r}", file=sys.stderr)
            return 2
        mm, build_with_images = None, None
        if args.image:
            print("error: --image needs --prompt (images are placed by the chat template)", file=sys.stderr)
            return 2
    else:
        from .checkpoint.tokenizer import ChatTokenizer

        tokenizer = ChatTokenizer.from_pretrained(ckpt, chat_template=args.chat_template or None)
        prompt_ids, mm, build_with_images = _chat_prompt(args, ckpt, tokenizer)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    engine, _ = make_engine(args, tokenizer, progress=not args.json)
    with engine:
        if build_with_images is not None:  # images decode and resize where the engine says, not here
            prompt_ids, mm = engine.submit_preprocessing(build_with_images).result()
        try:
            out = engine.generate(prompt_ids, params, mm_inputs=mm)
        except InvalidRequest as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"token_ids": out["token_ids"], "text": out["text"] if tokenizer else None,
                          "finish_reason": out["finish_reason"]}))
    elif tokenizer is not None:
        print(out["text"])
    else:
        print(",".join(map(str, out["token_ids"])))
    return 0


def _chat_prompt(args, ckpt: Path, tokenizer):
    """Applies the chat template to --prompt: returns (ids, None, None), or with --image files
    (read now, so a bad path fails before the model loads) (None, None, a function that builds
    (ids, image inputs))."""
    text = args.prompt if args.prompt is not None else "Hello!"
    if not args.image:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}]), None, None
    from functools import partial

    from .engine.multimodal import prompt_with_images, read_image_files

    images = read_image_files(args.image)
    return None, None, partial(prompt_with_images, ckpt, tokenizer, images, text, args.max_images)


def cmd_make_checkpoint(args) -> int:
    from .checkpoint.writer import write_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    write_checkpoint(out, preset=args.preset, seed=args.seed, experts_layout=args.experts_layout,
                     max_shard_bytes=int(args.max_shard_mb * 2**20), progress=True, fp8=args.fp8)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def cmd_serve(args) -> int:
    from .serve.local import serve_forever

    return serve_forever(args)


def cmd_top(args) -> int:
    from .top import run

    return run(args.url, args.interval, args.once, args.api_key)


def cmd_record_load(args) -> int:
    from .record_load import run

    if args.samples < 1:
        print("error: --samples must be at least 1", file=sys.stderr)
        return 2
    return run(args.url, args.out, args.samples, args.interval, args.api_key)


def cmd_plan(args) -> int:
    from .plan import Cluster, Workload, make_plan
    from .plan_output import plan_json, render

    for name in ("gpus", "nodes", "max_model_len", "max_prefill_tokens", "kv_block_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    cluster = Cluster(gpus=args.gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory, ep=args.ep)
    workload = Workload(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_prefill_tokens=args.max_prefill_tokens, vision=not args.text_only,
                        overhead_gib=args.overhead_gb, cpus_per_worker=args.cpus_per_worker,
                        kv_block_size=args.kv_block_size)
    plan = make_plan(args.model, cluster, workload, dtype=args.dtype)
    print(plan_json(plan) if args.json else render(plan))
    return 0 if plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .checkpoint.chat_template import ChatTemplateError
    from .checkpoint.errors import CheckpointError
    from .config import ConfigError
    from .multimodal.images import ImageError

    handlers = {"generate": cmd_generate, "make-checkpoint": cmd_make_checkpoint, "serve": cmd_serve,
                "top": cmd_top, "record-load": cmd_record_load, "plan": cmd_plan}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError, ChatTemplateError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
