"""``%twinkle`` line magic (``%load_ext twinkle_client``).

    %twinkle connect URL [--api-key K] [--session-id S] [--lease SECONDS]
    %twinkle resume                 # re-attach to the session saved in ~/.twinkle/connection.json
    %twinkle status
    %twinkle runs
    %twinkle checkpoints [RUN]
    %twinkle stop [SESSION|RUN]     # end that session's training loop at its next step boundary
    %twinkle disconnect [--keep]    # --keep: stop heart-beating but leave the session open for re-attach
    %twinkle --help

``$NAME`` in arguments is read from the environment when it is not a Python variable. Errors are shown as one
clear line (the cell fails, without a traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from twinkle.types import TwinkleError

from . import session as _session
from .widgets import checkpoints_frame, in_notebook, runs_frame


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # no sys.exit inside a kernel
        raise UsageError(f"%twinkle: {message}\n\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message)
        raise _Exit()


class _Exit(Exception):
    pass


def _parser() -> _Parser:
    p = _Parser(prog="%twinkle", description="Connect this kernel to a Twinkle server and inspect it.")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)
    c = sub.add_parser("connect", help="open a session on a server (becomes the current session)")
    c.add_argument("url", nargs="?", help="server URL (default: $TWINKLE_SERVER_URL)")
    c.add_argument("--api-key", dest="api_key", help="API key (default: $TWINKLE_API_KEY)")
    c.add_argument("--session-id", dest="session_id", help="re-attach to an existing session")
    c.add_argument("--lease", type=float, help="lease in seconds (default: $TWINKLE_LEASE_SECONDS or 600 in a notebook)")
    c.add_argument("--new", action="store_true",
                   help="open a fresh session instead of re-attaching to the one the previous kernel left")
    sub.add_parser("resume", help="re-attach to the session saved by the last connect")
    sub.add_parser("status", help="show the current session, server, base models and your runs")
    sub.add_parser("runs", help="list your training runs")
    k = sub.add_parser("checkpoints", help="list checkpoints (of one run, or all of yours)")
    k.add_argument("run", nargs="?")
    st = sub.add_parser("stop", help="ask a training loop to stop at its next step boundary (from any kernel)")
    st.add_argument("target", nargs="?", help="a session id or run id (default: this kernel's session)")
    d = sub.add_parser("disconnect", help="close the current session (its adapters are checkpointed and freed)")
    d.add_argument("--keep", action="store_true", help="leave the session open on the server (re-attach later)")
    return p


def _display(obj: Any, text: str) -> None:
    if in_notebook():
        from IPython.display import display

        display(obj)
    else:
        print(text)


def _table(rows: Any) -> str:
    if hasattr(rows, "to_string"):
        return rows.to_string(index=False) if len(rows) else "(none)"
    if not rows:
        return "(none)"
    keys = list(rows[0])
    return "\n".join(["  ".join(keys)] + ["  ".join(str(r.get(k)) for k in keys) for r in rows])


@magics_class
class TwinkleMagics(Magics):
    @line_magic
    def twinkle(self, line: str) -> None:
        try:
            args = _parser().parse_args(shlex.split(os.path.expandvars(line)))
        except _Exit:
            return None
        if args.cmd is None:
            print(_parser().format_help())
            return None
        try:
            return getattr(self, f"_cmd_{args.cmd}")(args)
        except TwinkleError as e:
            raise UsageError(f"%twinkle {args.cmd}: {type(e).__name__}: {e}") from None

    # ---- commands ------------------------------------------------------------------------------------------------
    def _user_ns(self) -> dict[str, Any]:
        if self.shell is None:  # a Magics instance registered outside a shell
            raise UsageError("%twinkle runs inside IPython")
        return self.shell.user_ns

    def _cmd_connect(self, args: argparse.Namespace) -> None:
        from .session import open_session

        url = args.url or os.environ.get("TWINKLE_SERVER_URL")
        if not url:
            raise UsageError("%twinkle connect: give a URL or set TWINKLE_SERVER_URL")
        key = args.api_key or os.environ.get("TWINKLE_API_KEY")
        old = _session.current_session(required=False)
        sess = open_session(url, key, session_id=args.session_id, new=args.new, lease_seconds=args.lease,
                            retry_seconds=5.0)
        if old is not None and old is not sess and old.session_id != sess.session_id:
            old.detach()
        self._user_ns()["twinkle_session"] = sess
        print(f"connected to {sess.url} — {sess.notice} (lease {sess.info.lease_seconds:.0f} s); "
              f"available as `twinkle_session`")

    def _cmd_resume(self, args: argparse.Namespace) -> None:
        sess = _session.Session.resume(retry_seconds=5.0, quiet=True)
        self._user_ns()["twinkle_session"] = sess
        print(f"connected to {sess.url} — {sess.notice}")

    def _cmd_status(self, args: argparse.Namespace) -> None:
        sess = _session.current_session()
        s = sess.summary()
        if "error" in s:
            raise UsageError(f"%twinkle status: {s['error']}")
        lines = [f"server   {s['url']} (v{s.get('version')})",
                 f"session  {s['session_id']} [{s['state']}], lease {s['lease_left_s']:.0f}/{s['lease_seconds']:.0f} s"]
        for m in s.get("base_models", []):
            used = sum(w["adapters"] for w in s.get("capacity", []) if w["base_model"] == m["name"])
            lines.append(f"model    {m['name']} ({m['backend']}) adapters {used}/{m['max_adapters'] * m.get('replicas', 1)}, "
                         f"max rank {m['max_lora_rank']}")
        for r in s.get("runs", []):
            lines.append(f"run      {r['run_id']} {r.get('name') or ''} [{r['state']}] step {r['step']}")
        _display(sess, "\n".join(lines))

    def _cmd_runs(self, args: argparse.Namespace) -> None:
        frame = runs_frame(_session.current_session().runs())
        _display(frame, _table(frame))

    def _cmd_checkpoints(self, args: argparse.Namespace) -> None:
        frame = checkpoints_frame(_session.current_session().checkpoints(args.run))
        _display(frame, _table(frame))

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        sess = _session.current_session()
        target = args.target or sess.session_id
        kind = "sessions" if target.startswith("s") and ":" not in target else "runs"
        info = sess.http.post(f"{kind}/{target}/stop")
        print(f"stop requested for session {info['session_id']}: its loop ends after the step in flight")

    def _cmd_disconnect(self, args: argparse.Namespace) -> None:
        sess = _session.current_session(required=False)
        if sess is None:
            print("not connected")
            return
        if args.keep:
            sess.detach()
            print(f"detached from session {sess.session_id} (still open on the server; `%twinkle resume` re-attaches)")
        else:
            sess.close()
            print(f"closed session {sess.session_id}")
        self._user_ns().pop("twinkle_session", None)
