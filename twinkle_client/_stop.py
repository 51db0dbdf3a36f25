"""Stopping a training loop at a step boundary, from anywhere — even while the kernel is busy.

A Stop click (the curve widget's button or the JupyterLab panel, through the Jupyter server), ``%twinkle stop``
from another kernel, or ``Session.request_stop()`` sets a flag on the *server's* session. The flag rides back
on the replies of the session's next training calls (``FutureRef.stop_requested``), so the busy kernel learns of
it without reading any comm message. The loop then ends at the next step boundary:

* ``LiveCurve.iterate`` / ``.range`` check before handing out the next item: the loop just ends;
* a plain ``for`` loop: the next ``forward_backward`` that would *start* a step raises :class:`TrainingStopped`,
  shown as one line (no traceback) in IPython.

Either way the step in flight completes (its ``optim_step`` is applied) and the flag is cleared on the server.
Ctrl-C inside ``LiveCurve.iterate`` does the same locally (a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["TrainingStopped", "sigint_stops"]


class TrainingStopped(Exception):
    """The loop was asked to stop; raised at a step boundary (the previous step completed)."""

    def _render_traceback_(self) -> list[str]:  # IPython: one line instead of a traceback
        return [str(self)]


@contextmanager
def sigint_stops(on_first: Callable[[], None]) -> Iterator[None]:
    """While active (main thread only), the first Ctrl-C calls ``on_first`` (stop after this step); a second
    one raises ``KeyboardInterrupt`` as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        pressed["n"] += 1
        if pressed["n"] == 1:
            on_first()
            return
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main interpreter thread after all
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
