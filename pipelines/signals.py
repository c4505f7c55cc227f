"""Stop signals: SIGINT (Ctrl-C), SIGTERM (a scheduler's pre-emption or time limit) and SIGHUP.

During a run, each of them unwinds the run the way Ctrl-C does: a
:class:`Stopped` exception (a ``KeyboardInterrupt``) is raised in the main
thread (and again at the loops' safe points, :func:`check_stop`, should
Python have swallowed it), what was computed stays in the partial output, temporary files and
the lock are removed, and the command exits with the shell's convention,
128 + the signal's number (130, 143, 129). Neighbour workers ignore them and
leave the stopping to the run, which ends them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal received during a run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(exc: KeyboardInterrupt) -> signal.Signals:
    """The signal behind ``exc``: its own, or SIGINT for a plain KeyboardInterrupt."""
    return signal.Signals(getattr(exc, "signum", signal.SIGINT))


_state = {"depth": 0, "received": None}


def _stop(signum, frame) -> None:
    if _state["received"] is not None:
        return  # already unwinding: let the cleanup finish
    _state["received"] = signum
    raise Stopped(signum)


def check_stop() -> None:
    """Raise :class:`Stopped` if a stop signal came and its exception was swallowed.

    The handler raises wherever the main thread is, and Python ignores an
    exception raised inside a weakref callback or a ``__del__`` (it prints
    "Exception ignored in ..." and goes on). The pipeline loops call this at
    their safe points (each structure run takes in, each relaxation step,
    each result batch from Ray: a dictionary lookup), so such a signal
    still stops the run there.
    """
    if _state["depth"] and _state["received"] is not None:
        raise Stopped(_state["received"])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within it, a stop signal raises :class:`Stopped` once; the previous handlers come back after.

    Nests (Ray installs its own SIGTERM handler when it starts, so the Ray
    plan takes it back inside the run's). Outside the main thread, where
    Python cannot handle signals, it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            _state["received"] = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_ignoring_stop_signals(initializer, *args) -> None:
    """A worker process's initializer: stop signals are the run's to handle, then ``initializer(*args)``.

    A terminal's Ctrl-C or a scheduler's SIGTERM reaches the whole process
    group; a worker that died of it first would look like a crash to the run.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    initializer(*args)
