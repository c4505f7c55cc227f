"""The Ray cluster a run uses: joined or started, and checked node by node before any output exists.

:func:`cluster` joins (or starts) Ray as :class:`RayOptions` say, then the
preflight: one small task on every alive node checks that it sees the input
and the model at the driver's absolute paths (the same file: its size and a
hash of its first and last MiB) and runs this package version; with GPU
actors, the cluster must have a GPU for every actor, all of one kind. A node
that does not fit is one line naming it. The same probe says whether each
node has device graphs installed: :func:`graphs_on_actors` decides from it
where the actors' graphs are built (``--graphs``). On the way out Ray's ``ray.data``
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
    """Ray task, pinned to one node: its name, package version, each path's size and sampled hash,
    and whether device graphs are installed there (found, not imported: Warp is not started)."""
    import importlib.util
    import os
    import socket

    from painn_export.version import __version__

    files = {}
    for path in paths:
        try:
            files[path] = (os.path.getsize(path), sample_digest(path))
        except OSError as exc:
            files[path] = (None, exc.strerror or str(exc))
    device_graphs = all(importlib.util.find_spec(name) is not None for name in ("nvalchemiops", "warp"))
    return {
        "node": socket.gethostname(),
        "version": __version__,
        "files": files,
        "device_graphs": device_graphs,
    }


def preflight(ray, paths: list[str]) -> list[dict]:
    """Check every alive node against this driver before any work; returns each node's facts
    (:func:`node_facts`, with its ``name`` for messages and Ray's ``resources``).

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
    checked = []
    for node, facts in zip(nodes, ray.get(refs)):
        name = f"{facts['node']} ({node.get('NodeManagerAddress', '?')}, Ray node {node['NodeID'][:8]})"
        checked.append({**facts, "name": name, "resources": node.get("Resources", {})})
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
    return checked


def graphs_on_actors(requested: str, options: RayOptions, nodes: list[dict]) -> bool:
    """Whether the inference actors build graphs on their device, for ``--graphs`` ``requested``.

    ``host``: no. ``device``: yes; ``auto``: when the actors run on GPUs
    (``--ray-gpus-per-actor``), as the local ``auto`` does. Either way every
    node an actor could run on (enough CPUs and GPUs for one; ``nodes`` from
    :func:`preflight`) must have device graphs installed: else ``device`` is
    :class:`PreflightError` naming the node, and ``auto`` builds on the host.
    """
    import logging

    if requested == "host" or (requested == "auto" and not options.gpus_per_actor):
        return False
    hosts = [
        n
        for n in nodes
        if float(n["resources"].get("CPU", 0)) >= options.cpus_per_actor
        and float(n["resources"].get("GPU", 0)) >= options.gpus_per_actor
    ]
    lacking = [n["name"] for n in hosts if not n["device_graphs"]]
    if not lacking:
        return True
    if requested == "device":
        raise PreflightError(
            f"node {lacking[0]} cannot build graphs on its device (--graphs device): "
            "pip install 'painn-export[device-graphs]' on every node, or give --graphs host"
        )
    logging.getLogger(__name__).info("graphs built on the host: node %s lacks device graphs", lacking[0])
    return False


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
def cluster(options: RayOptions, paths: list[str]) -> Iterator[list[dict]]:
    """Ray, joined or started as ``options`` say, with every node checked against ``paths``.

    Yields the alive nodes' facts (:func:`preflight`). Before any output file
    exists, a node that lacks a file or runs another version is
    :class:`PreflightError`. On the way out Ray's ``ray.data`` logger and
    ``DataContext`` are as they were, and a Ray started here is stopped.
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
            nodes = preflight(ray, paths)
            check_gpus(ray.nodes(), options)
        yield nodes
    finally:
        data_logger.setLevel(level)
        context.enable_progress_bars = progress_bars
        if started:
            ray.shutdown()
