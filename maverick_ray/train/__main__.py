"""python -m maverick_ray.train {train,eval}: train the demo model, or evaluate a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .loop import TrainArgs

    p = argparse.ArgumentParser(prog="python -m maverick_ray.train",
                                description="Train maverick-ray's tiny Llama 4 demo model on data every Python "
                                            "install has (stdlib code and docs, generated chats and pictures), "
                                            "or evaluate a checkpoint on held-out data.")
    sub = p.add_subparsers(dest="command", required=True)
    d = TrainArgs(out=Path("."))
    t = sub.add_parser("train", help="train and write an HF-layout checkpoint",
                       description="Train the demo model (seeded; about 20 minutes on 2 CPU cores) and write "
                                   "an HF-layout checkpoint, its tokenizer and a loss-curve PNG into OUT.")
    t.add_argument("out", metavar="OUT", type=Path, help="checkpoint directory to write")
    t.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    t.add_argument("--seed", type=int, default=d.seed, help=f"data and init seed (default: {d.seed})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    t.add_argument("--balance-coef", type=float, default=d.balance_coef,
                   help=f"load-balancing loss weight, 0 = off (default: {d.balance_coef})")
    t.add_argument("--vision-pretrain-steps", type=int, default=d.vision_pretrain_steps,
                   help=f"steps of vision-only pre-training before the main loop, 0 = none "
                        f"(default: {d.vision_pretrain_steps})")
    t.add_argument("--threads", type=int, default=d.threads, help=f"torch threads (default: {d.threads})")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="held-out evaluation of a checkpoint",
                       description="Held-out scores: image QA (shape, colour of new pictures), 2-digit addition "
                                   "on pairs never trained on, prose and code perplexity against a unigram "
                                   "baseline. Prints JSON.")
    e.add_argument("ckpt", metavar="CKPT", type=Path, help="checkpoint directory")
    e.add_argument("--n", type=int, default=200, help="questions per task (default: 200)")
    e.add_argument("--windows", type=int, default=32, help="held-out text windows per domain (default: 32)")
    e.add_argument("--seed", type=int, default=1234, help="seed of the new pictures (default: 1234)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .loop import TrainArgs, train

        s = train(TrainArgs(out=args.out, steps=args.steps, seed=args.seed, lr=args.lr,
                            balance_coef=args.balance_coef, vision_pretrain_steps=args.vision_pretrain_steps,
                            threads=args.threads, progress=not args.no_progress))
        print(json.dumps({k: v for k, v in s.items() if k != "history"}, indent=2))
        return 0
    from .evaluate import evaluate

    print(json.dumps(evaluate(args.ckpt, n=args.n, windows=args.windows, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
