"""The Ray cluster a run uses: joined or started, and checked node by node before any output exists.

:func:`cluster` joins (or starts) Ray as :class:`RayOptions` say, then the
preflight: one small task on every alive node checks that it sees the input
and the model at the driver's absolute paths (the same file: its size and a
hash of its first and last MiB) and runs this package version; with GPU
actors, the cluster must have a GPU for every actor, all of one kind. A node
that does not fit is one line naming it. On the way out Ray's ``ray.data``
logger and ``DataContext`` are as they were, and a Ray started here is
stopped. Ray is optional (``pip install painn-export[ray]``) and imported
only inside these functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

INSTALL_HINT = "--ray needs Ray Data: pip install 'painn-export[ray]'"


class RayUnavailableError(ImportError):
    """Ray is not installed; the message says what to install."""


class ClusterError(RuntimeError):
    """A Ray cluster that cannot run this job as the driver recorded it; the message names the node."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: ``address`` is ``local`` (start Ray here),
    ``auto`` (the cluster this machine belongs to) or a cluster address."""

    address: str = "local"
    actors: int = 1  # inference actors, one Runner each
    gpus_per_actor: float = 0.0
    cpus: int | None = None  # for a local Ray: CPUs it may use (default: all)
    # Structures per actor call, packed there into model batches: larger packs
    # better, smaller streams results back sooner and loses less to a dead node.
    actor_batch: int = 512
    cpus_per_actor: int = 1  # Ray reserves them for each actor; its runtime runs that many threads

    @property
    def device(self) -> str:
        """Where the actors run: ``cuda`` (the GPU Ray gave each) with GPUs per actor, else ``cpu``."""
        return "cuda" if self.gpus_per_actor else "cpu"


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(INSTALL_HINT) from exc
    return ray


def connect(options: RayOptions) -> bool:
    """Join or start Ray as ``options`` say; True when this call started it (and should stop it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # Actors' and tasks' output (their errors) reaches this process's stderr.
    quiet = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if options.address == "local":  # always a new Ray of its own, never another one on this machine
        ray.init(address="local", num_cpus=options.cpus, **quiet)
    else:
        ray.init(address=options.address, **quiet)
    return True


class PreflightError(ClusterError):
    """A node that cannot run the job: it lacks a file, or runs another package version."""


SAMPLE_BYTES = 1 << 20  # the preflight hashes a file's first and last MiB, not all of it


def sample_digest(path: str) -> str:
    """SHA-256 of a file's first and last :data:`SAMPLE_BYTES` (with its size, enough to tell files apart)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - SAMPLE_BYTES))
        digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def node_facts(paths: list[str]) -> dict:
    """Ray task, pinned to one node: its name, package version, and each path's size and sampled hash."""
    import os
    import socket

    from painn_export.version import __version__

    files = {}
    for path in paths:
        try:
            files[path] = (os.path.getsize(path), sample_digest(path))
        except OSError as exc:
            files[path] = (None, exc.strerror or str(exc))
    return {"node": socket.gethostname(), "version": __version__, "files": files}


def preflight(ray, paths: list[str]) -> int:
    """Check every alive node against this driver before any work; returns the number of nodes.

    Raises :class:`PreflightError` naming the node and the path (or the versions).
    """
    import socket

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = node_facts(paths)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(node_facts)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths
        )
        for n in nodes
    ]
    for node, facts in zip(nodes, ray.get(refs)):
        name = f"{facts['node']} ({node.get('NodeManagerAddress', '?')}, Ray node {node['NodeID'][:8]})"
        if facts["version"] != here["version"]:
            raise PreflightError(
                f"node {name} runs painn-export {facts['version']}, this driver {here['version']} "
                f"({socket.gethostname()}): install the same version on every node"
            )
        for path, (size, digest) in facts["files"].items():
            if size is None:
                raise PreflightError(
                    f"node {name} cannot read {path}: {digest}; every node needs it at this path"
                )
            if (size, digest) != here["files"][path]:
                raise PreflightError(f"node {name} sees another file at {path} than this driver does")
    return len(nodes)


def check_gpus(nodes: list[dict], options: RayOptions) -> None:
    """GPU actors need room on the alive ``nodes``: each actor's GPUs on one node, all of one kind.

    ``nodes`` is ``ray.nodes()``; a GPU's kind is the node's
    ``accelerator_type:<name>`` resource, as Ray detects it. Without this
    check, a cluster with too few GPUs waits for Ray Data's timeout.
    """
    if not options.gpus_per_actor:
        return
    alive = [n for n in nodes if n.get("Alive")]
    gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in alive]
    # An actor's GPUs come from one node: what each node can place, not the cluster's total.
    placeable = sum(math.floor(g / options.gpus_per_actor + 1e-9) for g in gpus)
    if placeable < options.actors:
        raise ClusterError(
            f"--ray-actors {options.actors} x --ray-gpus-per-actor {options.gpus_per_actor:g}: the cluster's "
            f"nodes (GPUs each: {', '.join(f'{g:g}' for g in gpus if g) or 'none'}) can place {placeable} "
            "such actors; use fewer actors or fewer GPUs per actor"
        )
    kinds = {}
    for n in alive:
        if float(n.get("Resources", {}).get("GPU", 0)):
            names = [k.partition(":")[2] for k in n.get("Resources", {}) if k.startswith("accelerator_type:")]
            kinds.setdefault(names[0] if names else "unknown", n.get("NodeManagerAddress", "?"))
    if len(kinds) > 1:
        which = ", ".join(f"{kind} ({address})" for kind, address in sorted(kinds.items()))
        raise ClusterError(
            f"the cluster's GPUs are of several kinds: {which}; one run's results come from one kind "
            "of GPU (its fingerprint): run on nodes of one kind"
        )


@contextmanager
def cluster(options: RayOptions, paths: list[str]) -> Iterator:
    """Ray, joined or started as ``options`` say, with every node checked against ``paths``.

    Yields the ``ray`` module. Before any output file exists, a node that
    lacks a file or runs another version is :class:`PreflightError`. On the
    way out Ray's ``ray.data`` logger and ``DataContext`` are as they were,
    and a Ray started here is stopped.
    """
    import logging

    from pipelines.signals import stop_on_signals

    ray = import_ray()
    # A Ray started here sets its own SIGTERM handler (exit 1, without a word): the run's is used.
    with stop_on_signals():
        started = connect(options)
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    context = ray.data.DataContext.get_current()
    progress_bars = context.enable_progress_bars
    try:
        data_logger.setLevel(logging.ERROR)  # its per-run INFO lines are noise here
        context.enable_progress_bars = False  # painn-batch draws its own
        with stop_on_signals():
            preflight(ray, paths)
            check_gpus(ray.nodes(), options)
        yield ray
    finally:
        data_logger.setLevel(level)
        context.enable_progress_bars = progress_bars
        if started:
            ray.shutdown()
