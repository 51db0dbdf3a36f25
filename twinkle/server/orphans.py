"""Leftovers of a launcher that was killed (SIGKILL, OOM): Ray's processes and Serve's HAProxy keep running
and HAProxy keeps the server's port, answering 500. A new launch finds and stops them, or says clearly
what holds the port.

Every process a launch starts inherits ``TWINKLE_LAUNCH_ID`` (and the launcher's pid and start time) from
the launcher's environment: Ray's GCS, raylet and workers, the Serve replicas and the HAProxy they run. A
process whose launch id belongs to a launcher that no longer exists is an orphan. Only orphans are ever
signalled, never a live launch's processes and never a process without the marker (other users' Ray
clusters on the same machine are safe). Linux only (``/proc``); elsewhere nothing is found.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass

from twinkle.types import InvalidInputError

__all__ = ["Orphans", "PortBusyError", "find_orphans", "mark_launch", "port_holders", "prepare_port", "reap", "reap_state",
           "record_ray_session"]

log = logging.getLogger("twinkle.server")

LAUNCH_ID = "TWINKLE_LAUNCH_ID"
LAUNCHER_PID = "TWINKLE_LAUNCHER_PID"
LAUNCHER_START = "TWINKLE_LAUNCHER_START"
LAUNCH_STATE = "TWINKLE_LAUNCH_STATE"  # the launch's SQLite file: a new launch on the same state reaps it


class PortBusyError(InvalidInputError):
    """The server's port is held by a process that is not an orphan of a twinkle launch."""


@dataclass
class Orphans:
    launch_id: str
    state: str
    pids: list[int]


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k.startswith(b"TWINKLE_LAUNCH"):
            out[k.decode()] = v.decode(errors="replace")
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    if not os.path.isdir("/proc"):
        return []
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def mark_launch(state: str = "") -> str:
    """Give this launcher (and every process it starts from now on) a launch id. Returns it."""
    launch_id = uuid.uuid4().hex
    os.environ[LAUNCH_ID] = launch_id
    os.environ[LAUNCH_STATE] = state
    os.environ[LAUNCHER_PID] = str(os.getpid())
    os.environ[LAUNCHER_START] = _start_time(os.getpid()) or ""
    return launch_id


def _launcher_alive(env: dict[str, str]) -> bool:
    try:
        pid = int(env.get(LAUNCHER_PID, ""))
    except ValueError:
        return False
    start = _start_time(pid)
    return start is not None and start == env.get(LAUNCHER_START, start)


def find_orphans() -> list[Orphans]:
    """The processes of launches whose launcher is gone, grouped by launch. Some of a launch's processes (Ray's
    dashboard and runtime-env agents) carry its launcher's pid but not its start time: they take it from a
    sibling, or a dead launcher's pid reused by any new process would make them look like a live launch's
    (seen once in CI: the agents survived the relaunch)."""
    me = os.getpid()
    mine = os.environ.get(LAUNCH_ID)
    envs: dict[int, dict[str, str]] = {}
    starts: dict[str, str] = {}
    states: dict[str, str] = {}
    for pid in _pids():
        if pid == me:
            continue
        env = _environ(pid)
        lid = env.get(LAUNCH_ID)
        if not lid or lid == mine:
            continue
        envs[pid] = env
        if env.get(LAUNCHER_START):
            starts.setdefault(lid, env[LAUNCHER_START])
        if env.get(LAUNCH_STATE):
            states.setdefault(lid, env[LAUNCH_STATE])
    groups: dict[str, Orphans] = {}
    for pid, env in envs.items():
        lid = env[LAUNCH_ID]
        if not env.get(LAUNCHER_START) and lid in starts:
            env = {**env, LAUNCHER_START: starts[lid]}
        if _launcher_alive(env):
            continue
        groups.setdefault(lid, Orphans(lid, states.get(lid, ""), [])).pids.append(pid)
    return list(groups.values())


def _record_path(state: str) -> str:
    return f"{state}.launch.json"


def record_ray_session(state: str, session_dir: str) -> None:
    """Note, beside the state file, the Ray session directory this launch's processes write their logs in, with
    the launcher's pid and start time. Ray's agents rename themselves (setproctitle), which overwrites
    ``/proc/<pid>/environ`` where the launch marks are: a relaunch on this state then finds them by the files
    they hold open in that directory (``reap_state``)."""
    if not state or not session_dir:
        return
    rec = {LAUNCHER_PID: str(os.getpid()), LAUNCHER_START: _start_time(os.getpid()) or "",
           "session_dir": os.path.realpath(session_dir)}
    try:
        with open(_record_path(state), "w") as fh:
            json.dump(rec, fh)
    except OSError:
        log.debug("could not write the launch record beside %s", state, exc_info=True)


def _holds_files_under(pid: int, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _session_leftovers(state: str) -> list[int]:
    """Processes of the dead launch recorded for ``state``, found by the files they hold in its Ray session
    directory (that launch's own: no other process writes there), whatever their launch marks still show."""
    try:
        with open(_record_path(state)) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return []
    session = rec.get("session_dir") if isinstance(rec, dict) else None
    if not isinstance(session, str) or not session.startswith("/") or _launcher_alive(rec):
        return []
    prefix = session.rstrip("/") + "/"
    me = os.getpid()
    return [pid for pid in _pids() if pid != me and _holds_files_under(pid, prefix)]


def reap_state(state: str) -> int:
    """Stop the orphans of dead launches that served the same state file. Returns how many were signalled."""
    n = 0
    done: set[int] = set()
    for group in find_orphans():
        if state and group.state == state:
            log.warning("stopping %d leftover processes of a killed twinkle launcher (launch %s) that served %s",
                        len(group.pids), group.launch_id[:8], state)
            n += reap(group.pids)
            done.update(group.pids)
    left = [pid for pid in _session_leftovers(state) if pid not in done] if state else []
    if left:
        log.warning("stopping %d leftover processes of a killed twinkle launcher that served %s (found by their "
                    "files in its Ray session directory: their launch marks were overwritten)", len(left), state)
        n += reap(left)
    return n


def reap(pids: list[int], grace_s: float = 3.0) -> int:
    """SIGTERM, then SIGKILL whatever is left after ``grace_s``. Returns how many were signalled."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            sent.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    alive = list(sent)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and not _zombie(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(sent)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except OSError:
        return True


def _listen_inodes(port: int) -> set[str]:
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def port_holders(port: int) -> list[int]:
    """The pids with a socket listening on ``port`` (those this user may inspect)."""
    inodes = _listen_inodes(port)
    if not inodes:
        return []
    out = []
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.append(pid)
                break
    return out


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def prepare_port(host: str, port: int, *, wait_s: float = 10.0) -> int:
    """Before a launch on ``host:port``: stop the orphans of dead launches that hold the port (with all the
    other processes of their launch); raise :class:`PortBusyError` naming the holder when something else
    holds it. Returns how many processes were stopped."""
    if _port_free(host, port):
        return 0
    holders = set(port_holders(port))
    stopped = 0
    for group in find_orphans():
        if holders & set(group.pids):
            log.warning("port %d is held by leftovers of a killed twinkle launcher (launch %s, pids %s): "
                        "stopping them", port, group.launch_id[:8], group.pids)
            stopped += reap(group.pids)
    deadline = time.monotonic() + wait_s
    while not _port_free(host, port):
        if time.monotonic() >= deadline or not stopped:
            who = ", ".join(f"pid {p} ({_cmdline(p)[:80] or '?'})" for p in sorted(port_holders(port))) or \
                "a process this user cannot inspect"
            raise PortBusyError(
                f"port {port} on {host} is already in use by {who}; stop it, or launch on another port (--port)",
                field="http.port")
        time.sleep(0.1)
    return stopped
