"""Stop signals: SIGINT (Ctrl-C), SIGTERM (a scheduler's pre-emption or time limit) and SIGHUP.

During a run, each of them unwinds the run the way Ctrl-C does: a
:class:`Stopped` exception (a ``KeyboardInterrupt``) is raised in the main
thread (and again at the loops' safe points, :func:`check_stop`, should
Python have swallowed it), what was computed stays in the partial output, temporary files and
the lock are removed, and the command exits with the shell's convention,
128 + the signal's number (130, 143, 129). Neighbour workers ignore them and
leave the stopping to the run, which ends them.

A loop that keeps state worth saving (``relax``'s optimiser) runs inside
:func:`stop_at_safe_points`: the first signal then stops it at its next
:func:`check_stop`, where it writes a last checkpoint; a second stops it at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal received during a run.

    ``safe``: raised by :func:`check_stop` at a loop's safe point (its state
    whole, worth a last checkpoint), not wherever the main thread was.
    """

    def __init__(self, signum: int, safe: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.safe = safe


def signal_of(exc: KeyboardInterrupt) -> signal.Signals:
    """The signal behind ``exc``: its own, or SIGINT for a plain KeyboardInterrupt."""
    return signal.Signals(getattr(exc, "signum", signal.SIGINT))


_state = {"depth": 0, "received": None, "defer": 0, "forced": False}


def _stop(signum, frame) -> None:
    if _state["received"] is None:
        _state["received"] = signum
        if _state["defer"]:
            return  # check_stop raises it at the loop's next safe point
        raise Stopped(signum)
    if _state["defer"] and not _state["forced"]:
        _state["forced"] = True  # a second signal while deferred: stop now, without a last checkpoint
        raise Stopped(signum)
    # already unwinding: let the cleanup finish


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
        raise Stopped(_state["received"], safe=True)


@contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within it (inside :func:`stop_on_signals`), a first stop signal only stops at :func:`check_stop`.

    For a loop that writes a last checkpoint when stopped: the signal must not
    cut a step in half. A second signal stops at once (``Stopped.safe`` false):
    what the last checkpoint holds is then what ``--resume`` continues from.
    """
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


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
            _state["forced"] = False
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
