"""Where a runtime's graphs are built: on the host, or on the runtime's device (``--graphs``).

Its own small module: deciding imports neither torch nor Warp unless the
answer may be the device (:mod:`painn_export.device_graphs` needs both).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

GRAPHS = ("auto", "host", "device")  # where graphs are built: what --graphs and graphs= take


def graphs_on_device(requested: str, runner_device: str) -> bool:
    """Whether graphs for a runtime on ``runner_device`` are built there, for ``requested`` (:data:`GRAPHS`).

    ``device``: yes (not installed: RuntimeUnavailableError, never a quiet
    host run); ``host``: no; ``auto``: when the runtime runs on a GPU and
    device graphs are installed (else the host, logged).
    """
    if requested not in GRAPHS:
        raise ValueError(f"graphs must be one of {', '.join(GRAPHS)}, got {requested!r}")
    if requested == "host" or (requested == "auto" and not runner_device.startswith("cuda")):
        return False
    from painn_export.device_graphs import start
    from painn_export.errors import RuntimeUnavailableError

    try:
        start()
    except RuntimeUnavailableError as exc:
        if requested == "device":
            raise
        log.info("graphs built on the host: %s", exc)
        return False
    return True
