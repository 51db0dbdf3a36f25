"""``twinkle``: the user command line. ``twinkle quickstart`` trains a toy self-cognition adapter.

Examples::

    twinkle quickstart                       # builtin://tiny, name "Twinkle", ~100 steps
    twinkle quickstart --name Nova --steps 150 --seed 1
    twinkle models                           # the builtin models and where they are cached
"""

from __future__ import annotations

import argparse
import sys

from twinkle.types import TwinkleError

__all__ = ["main"]


def _quickstart(args: argparse.Namespace) -> int:
    from twinkle.quickstart import QuickstartConfig, format_summary, model_label, run_quickstart

    threads = args.threads or (1 if args.model == "builtin://tiny" else 0)
    if threads:  # a ~1M-parameter model gains nothing from more threads, and they spin on a busy machine
        import torch

        torch.set_num_threads(threads)
    try:  # the quickstart has its own progress bar; hide the one transformers shows while loading weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    cfg = QuickstartConfig(model_id=args.model, name=args.name, author=args.author, steps=args.steps,
                           seed=args.seed, lr=args.lr, rank=args.rank, batch_size=args.batch_size)
    print(f"Training a self-cognition LoRA on {model_label(cfg.model_id)}", flush=True)
    res = run_quickstart(cfg, progress=not args.quiet)
    print(format_summary(res), flush=True)
    return 0 if res.passed else 1


def _models(args: argparse.Namespace) -> int:
    from twinkle.model.builtin import BUILTIN_MODELS, builtin_dir_name
    from twinkle.model.hub import models_dir, resolve_model

    for name, spec in sorted(BUILTIN_MODELS.items()):
        path = models_dir() / builtin_dir_name(name)
        if args.build:
            path = resolve_model(f"builtin://{name}")
        state = "built" if path.is_dir() else "not built yet"
        print(f"builtin://{name:<6} {spec.description}\n    {path} ({state})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinkle", description="Twinkle: LoRA training as a service.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="train a toy model to know its name, then ask it who it is")
    q.add_argument("--name", default="Twinkle", help="the identity to teach (default: Twinkle)")
    q.add_argument("--author", default="the Twinkle team", help="who the model says made it")
    q.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    q.add_argument("--model", default="builtin://tiny", help="base model id (default: builtin://tiny)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--rank", type=int, default=32, help="LoRA rank (default: 32)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 1 for builtin://tiny, else torch's choice)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quickstart)
    m = sub.add_parser("models", help="list the builtin models")
    m.add_argument("--build", action="store_true", help="build them now")
    m.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TwinkleError as e:
        field = f" (field: {e.field})" if e.field else ""
        print(f"error: {e.message}{field}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
