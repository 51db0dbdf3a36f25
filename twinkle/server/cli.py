"""``twinkle-server``: launch, check-config, print-config, keys create|list|revoke.

Examples::

    twinkle-server launch -c cookbook/client/server/transformer/server_config.yaml
    twinkle-server launch -c server_config.yaml --address auto      # join a running Ray cluster
    twinkle-server check-config -c server_config.yaml
    twinkle-server print-config -c server_config.yaml --format json
    twinkle-server keys create --user alice -c server_config.yaml   # the key alone on the last line
    twinkle-server keys list -c server_config.yaml
    twinkle-server keys revoke k-0123abcd -c server_config.yaml
    twinkle-server usage -c server_config.yaml --since 24h --format csv
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twinkle.types import TwinkleError

from .config import ConfigError, ServerConfig, dump_config, load_config

__all__ = ["main"]


def _load(args: argparse.Namespace) -> ServerConfig:
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["http.port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["http.host"] = args.host
    return load_config(args.config, overrides)


def _store(cfg: ServerConfig) -> Any:
    from .store import Store

    return Store(cfg.persistence.sqlite_file())


def _cmd_launch(args: argparse.Namespace) -> int:
    from .launcher import launch, shadow_optional_imports

    shadow_optional_imports()  # this process exists only to run the server
    cfg = _load(args)
    launch(cfg, address=args.address, num_cpus=args.num_cpus)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for i, m in enumerate(cfg.models):
        if ":" in m.backend:  # a custom backend: it must import here (and on every node) and be a Backend
            from .backends import load_backend_class

            try:
                load_backend_class(m.backend)
            except TwinkleError as e:
                raise ConfigError(f"models[{i}].backend: {e}", field=f"models[{i}].backend") from None
    names = ", ".join(f"{m.served_name} ({m.backend}, {m.model_id}, x{m.replicas})" for m in cfg.models)
    tel = cfg.telemetry
    if tel.enabled:
        parts = [f"prometheus {tel.prometheus.path} ({tel.prometheus.access})" if tel.prometheus.enabled else ""]
        if tel.otlp.endpoint:
            parts.append(f"otlp {tel.otlp.protocol} {tel.otlp.endpoint}")
        telemetry = "on: " + ", ".join(p for p in parts if p)
    else:
        telemetry = "off"
    print(f"config OK: {args.config}\n  http {cfg.http.host}:{cfg.http.port}\n  models: {names}\n"
          f"  telemetry: {telemetry}")
    return 0


def _cmd_print(args: argparse.Namespace) -> int:
    print(dump_config(_load(args), args.format), end="" if args.format == "yaml" else "\n")
    return 0


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from .service import validate_user_name

    cfg = _load(args)
    user = validate_user_name(args.user)
    key_id, key = _store(cfg).create_key(user, is_admin=args.admin, note=args.note)
    print(f"created key {key_id} for user {user!r} (shown once; store it safely):", file=sys.stderr)
    print(key)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    import time

    rows = _store(_load(args)).list_keys(args.user)
    print(f"{'key_id':<16} {'user':<20} {'created':<20} {'state':<8} admin")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        state = "revoked" if r["revoked_at"] else "active"
        print(f"{r['key_id']:<16} {r['user']:<20} {created:<20} {state:<8} {'yes' if r['is_admin'] else 'no'}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not _store(_load(args)).revoke_key(args.key_id):
        print(f"error: no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _cmd_usage(args: argparse.Namespace) -> int:
    from .telemetry.report import format_usage, usage_report

    print(format_usage(usage_report(_store(_load(args)), args.user, args.since, args.until), args.format))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinkle-server", description="Twinkle training server (Ray Serve)")
    sub = p.add_subparsers(dest="command", required=True)

    def _with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", required=True, help="server_config.yaml")
        sp.add_argument("--port", type=int, default=None, help="override http.port")
        sp.add_argument("--host", default=None, help="override http.host")

    lp = sub.add_parser("launch", help="start the server and block until Ctrl-C")
    _with_config(lp)
    lp.add_argument("--address", default=None,
                    help="join an existing Ray cluster: 'auto', 'ray://head:10001' or 'head:6379' "
                         "(default: start a local Ray)")
    lp.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    lp.set_defaults(func=_cmd_launch)

    cp = sub.add_parser("check-config", help="validate a config file")
    _with_config(cp)
    cp.set_defaults(func=_cmd_check)

    pp = sub.add_parser("print-config", help="print the effective config (defaults filled in)")
    _with_config(pp)
    pp.add_argument("--format", choices=["yaml", "json"], default="yaml")
    pp.set_defaults(func=_cmd_print)

    kp = sub.add_parser("keys", help="manage API keys")
    ksub = kp.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key; prints it alone on the last line")
    _with_config(kc)
    kc.add_argument("--user", required=True)
    kc.add_argument("--admin", action="store_true")
    kc.add_argument("--note", default=None)
    kc.set_defaults(func=_cmd_keys_create)
    kl = ksub.add_parser("list", help="list keys (never the keys themselves)")
    _with_config(kl)
    kl.add_argument("--user", default=None)
    kl.set_defaults(func=_cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    _with_config(kr)
    kr.add_argument("key_id")
    kr.set_defaults(func=_cmd_keys_revoke)

    up = sub.add_parser("usage", help="tokens trained/prefilled/sampled and checkpoint storage per user")
    _with_config(up)
    up.add_argument("--user", default=None, help="one user (default: everyone)")
    up.add_argument("--since", default=None, help="ISO time, epoch seconds or a duration back (24h, 7d)")
    up.add_argument("--until", default=None, help="ISO time, epoch seconds or a duration back")
    up.add_argument("--format", choices=["table", "json", "csv"], default="table")
    up.set_defaults(func=_cmd_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TwinkleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
