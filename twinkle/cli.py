"""``twinkle``: the user command line. ``twinkle quickstart`` trains a toy self-cognition adapter on a server.

Examples::

    twinkle quickstart                       # local server on builtin://tiny, trains through twinkle_client
    twinkle quickstart --in-process          # the same training in this process, no server
    twinkle quickstart --url http://host:8000 --api-key KEY   # on a server that is already running
    twinkle quickstart --name Nova --steps 150 --seed 1
    twinkle models                           # the builtin models and where they are cached
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from twinkle.types import TwinkleError

__all__ = ["main"]


def _quickstart(args: argparse.Namespace) -> int:
    from twinkle.quickstart import QuickstartConfig, format_summary, model_label

    cfg = QuickstartConfig(model_id=args.model, name=args.name, author=args.author, steps=args.steps,
                           seed=args.seed, lr=args.lr, rank=args.rank, batch_size=args.batch_size)
    cfg.validate()
    threads = args.threads or (1 if args.model == "builtin://tiny" else 0)
    t0 = time.perf_counter()
    if args.in_process:
        res = _quickstart_in_process(cfg, threads, args.quiet)
    elif args.url:
        print(f"Training a self-cognition LoRA on {model_label(cfg.model_id)}\n"
              f"through twinkle_client on the server at {args.url}", flush=True)
        from twinkle.quickstart import run_quickstart_remote

        res = run_quickstart_remote(cfg, url=args.url, api_key=args.api_key or os.environ.get("TWINKLE_API_KEY"),
                                    progress=not args.quiet)
    else:
        res = _quickstart_on_local_server(cfg, threads or 1, args.quiet)
    res.seconds = time.perf_counter() - t0
    print(format_summary(res), flush=True)
    return 0 if res.passed else 1


def _quickstart_in_process(cfg: Any, threads: int, quiet: bool) -> Any:
    from twinkle.quickstart import model_label, run_quickstart

    if threads:  # a ~1M-parameter model gains nothing from more threads, and they spin on a busy machine
        import torch

        torch.set_num_threads(threads)
    try:  # the quickstart has its own progress bar; hide the one transformers shows while loading weights
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    print(f"Training a self-cognition LoRA on {model_label(cfg.model_id)} (in this process)", flush=True)
    res = run_quickstart(cfg, progress=not quiet)
    res.extra["where"] = "this process (twinkle.model)"
    return res


def _quickstart_on_local_server(cfg: Any, threads: int, quiet: bool) -> Any:
    """Start ``twinkle-server launch`` on a free loopback port, train through ``twinkle_client``, stop it."""
    from twinkle.local_server import LocalServer
    from twinkle.quickstart import model_label, run_quickstart_remote

    print(f"Starting a local Twinkle server hosting {model_label(cfg.model_id)}", flush=True)
    backend = "mock" if cfg.model_id.startswith("mock://") else "transformers"
    server = LocalServer(cfg.model_id, backend, threads=threads)
    tty = sys.stderr.isatty()
    last = [-1]

    def _waiting(elapsed: float) -> None:  # a live counter on a terminal, a line every 10 s in a log
        tick = int(elapsed) if tty else int(elapsed) // 10 * 10
        if quiet or tick == last[0] or (not tty and tick == 0):
            return
        last[0] = tick
        msg = f"  waiting for the server to become healthy... {tick:3d} s"
        print(f"\r{msg}" if tty else msg, end="" if tty else "\n", file=sys.stderr, flush=True)

    stop_s = 0.0
    _sigterm_as_interrupt()
    try:
        server.start(on_wait=_waiting)
        if tty and last[0] >= 0:
            print(file=sys.stderr, flush=True)
        start_s = server.start_seconds or 0.0
        print(f"  server ready at {server.url} in {start_s:.1f} s (store, key and log in {server.workdir})",
              flush=True)
        report = server.wait_startup_report()
        if report and "started in" in report:
            print(f"  {report[report.index('(') :]}" if "(" in report else f"  {report}", flush=True)
        print("Training a self-cognition LoRA through twinkle_client", flush=True)
        res = run_quickstart_remote(cfg, url=server.url, api_key=server.api_key, progress=not quiet)
        res.extra["where"] = "local server (twinkle_client)"
    finally:
        if server.proc is not None:
            print("Stopping the server (Ctrl-C to the server, waiting for a clean shutdown)...", flush=True)
            t = time.perf_counter()
            code = server.stop()
            stop_s = time.perf_counter() - t
            left = (f"killed {server.leftovers} leftover process(es)" if server.leftovers
                    else "nothing left running")
            print(f"  server stopped in {stop_s:.1f} s (exit code {code}); {left}", flush=True)
    res.timings = {"server start": start_s, **res.timings, "shutdown": stop_s}
    res.extra["server_log_tail"] = server.log_tail(5)
    return res


def _sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so the server is still stopped (main thread only)."""
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


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
    where = q.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true",
                       help="train in this process (twinkle.model), no server")
    where.add_argument("--url", default=None,
                       help="use the Twinkle server already running at URL instead of starting one")
    q.add_argument("--api-key", default=None, help="API key for --url (default: $TWINKLE_API_KEY)")
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
