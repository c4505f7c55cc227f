"""Structures, graphs and results as columns of arrays: how they travel between Ray's tasks, actors
and driver.

No Ray here (numpy only): the columns are what Ray Data stores as Arrow
tensor columns (variable-shaped where each row's array has its own length),
never pickled objects. A graph row (host graphs) is :func:`graph_arrays`
plus its index, status, message and closest pair; a structure row (device
graphs: the actor builds the graph) is :data:`STRUCTURE_COLUMNS`, the input's
own arrays; a result row is index, energy, forces, stress, status, message,
who computed it (:func:`ran_by`) and the seconds in the runtime and in
device graphs. The local pipeline's writer takes what :func:`commit` reads out.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from pipelines.device_batches import Held, Structures
from pipelines.ray_cluster import ClusterError


class ActorMismatchError(ClusterError):
    """An actor computed with another package version, model file or runner than the driver recorded."""


def ran_by(identity, model_sha256: str) -> dict:
    """What computed a result: the package version, the model file's hash, the runner's identity."""
    from painn_export.version import __version__

    return {"package_version": __version__, "model_sha256": model_sha256, **asdict(identity)}


def graph_arrays(feed_dtype=np.float32) -> dict[str, np.ndarray]:
    """A graph's arrays, as tensor columns: each with its "no graph" (or "no cell") value, of its rank
    and dtype; a float32 feed's graphs travel with int32 indices and float32 shifts."""
    narrow = np.dtype(feed_dtype) == np.float32
    index, shift = (np.int32, np.float32) if narrow else (np.int64, np.float64)
    return {
        "atomic_numbers": np.zeros(0, np.int64),
        "positions": np.zeros((0, 3)),
        "edge_index": np.zeros((2, 0), index),
        "cell_shift": np.zeros((0, 3), index),
        "edge_shift": np.zeros((0, 3), shift),
        "edge_slot": np.zeros(0, index),
        "edge_reverse": np.zeros(0, index),
        "cell": np.zeros((0, 3)),
    }


def _array(graph, name: str, empty: np.ndarray) -> np.ndarray:
    value = getattr(graph, name)
    return empty if value is None else np.asarray(value, dtype=empty.dtype)


def ragged(arrays: list) -> np.ndarray:
    """A 1-d object column of arrays (Ray Data stores it as a variable-shaped tensor column).

    Filled one by one: numpy would stack arrays of equal shapes into one
    array of higher rank.
    """
    column = np.empty(len(arrays), dtype=object)
    for k, array in enumerate(arrays):
        column[k] = array
    return column


def graph_of(batch: dict, k: int):
    """Row ``k``'s graph, rebuilt from its tensor columns; None for a structure without one."""
    from painn_export.batch import Graph

    if not len(batch["atomic_numbers"][k]):
        return None
    arrays = {name: np.asarray(batch[name][k]) for name in graph_arrays()}
    if not len(arrays["cell"]):
        arrays["cell"] = None
    # Checked where it was built (the graph task): not again per batch.
    return Graph.from_checked(**arrays, min_distance=float(batch["min_distance"][k]))


# A structure row: its index in the input, atoms, atomic numbers [n], positions [n, 3] Å,
# cell [3, 3] Å and pbc [3] (as 0/1: Arrow's tensor columns hold numbers).
STRUCTURE_COLUMNS = ("index", "natoms", "atomic_numbers", "positions", "cell", "pbc")


def structure_columns(structures) -> dict:
    """One row per structure of a :class:`~pipelines.device_batches.Structures`: what a read task returns."""
    cuts = np.cumsum(structures.natoms)[:-1]

    def split(array: np.ndarray) -> np.ndarray:
        return ragged(np.split(array, cuts) if structures.natoms.size else [])

    return {
        "index": np.asarray(structures.index, dtype=np.int64),
        "natoms": np.asarray(structures.natoms, dtype=np.int64),
        "atomic_numbers": split(structures.atomic_numbers),
        "positions": split(structures.positions),
        "cell": np.asarray(structures.cell, dtype=np.float64),
        "pbc": np.asarray(structures.pbc, dtype=np.uint8),
    }


def structures_of(batch: dict):
    """The :class:`~pipelines.device_batches.Structures` of a batch of structure rows, in its order."""

    def joined(name: str, shape: tuple, dtype) -> np.ndarray:
        """A column's rows one after another (a tensor column of one shape, or one array a row)."""
        column = batch[name]
        if column.dtype != object:
            return np.asarray(column, dtype=dtype).reshape(shape)
        parts = [np.asarray(a, dtype=dtype).reshape(shape) for a in column]
        return np.concatenate(parts) if parts else np.zeros((0, *shape[1:]), dtype)

    return Structures(
        index=np.asarray(batch["index"], dtype=np.int64),
        atomic_numbers=joined("atomic_numbers", (-1,), np.int64),
        positions=joined("positions", (-1, 3), np.float64),
        cell=joined("cell", (-1, 3, 3), np.float64),
        pbc=joined("pbc", (-1, 3), np.uint8).astype(bool),
        natoms=np.asarray(batch["natoms"], dtype=np.int64),
    )


def graph_columns(items, feed_dtype=np.float32) -> dict:
    """One row per item (a graph, or a status): the columns a graph task returns.

    A float32 feed's graphs travel narrowed (:func:`pipelines.graphs.for_float32_feed`);
    a float64 feed's keep their float64 shifts.
    """
    graphs = [it.graph for it in items]
    columns = {
        "index": np.asarray([it.index for it in items], dtype=np.int64),
        "status": np.asarray([it.status for it in items], dtype=object),
        "message": np.asarray([it.message for it in items], dtype=object),
        "min_distance": np.asarray([np.inf if g is None else g.min_distance for g in graphs]),
    }
    for name, empty in graph_arrays(feed_dtype).items():
        columns[name] = ragged([empty if g is None else _array(g, name, empty) for g in graphs])
    return columns


class Collector(Held):
    """What the local writer would receive, kept for the driver (same two calls)."""

    def as_batch(self, ran_by: str, model_seconds: float, graph_seconds: float = 0.0) -> dict:
        """Columns of what came back: forces ``[n, 3]`` (``[0, 3]`` for none) and stress ``[3, 3]``
        (``[0, 3]`` for none) as tensor columns; who computed it, and its seconds in the runtime
        and in device graphs."""
        # The runtime's own dtype travels (float32: half the bytes of float64); one dtype per column.
        dtype = self.results[0][2].dtype if self.results else np.float64
        no_forces, no_stress = np.zeros((0, 3), dtype), np.zeros((0, 3), dtype)
        rows = [(i, e, f, no_stress if st is None else st, kind, "") for i, e, f, st, kind in self.results]
        rows += [(i, np.nan, no_forces, no_stress, kind, message) for i, kind, message in self.statuses]
        seconds, graphs = np.zeros(len(rows)), np.zeros(len(rows))
        seconds[:1], graphs[:1] = model_seconds, graph_seconds  # the batch's, on its first row
        return {
            "index": np.asarray([r[0] for r in rows], dtype=np.int64),
            "energy": np.asarray([r[1] for r in rows], dtype=np.float64),
            "forces": ragged([np.asarray(r[2], dtype=dtype) for r in rows]),
            "stress": ragged([np.asarray(r[3], dtype=dtype) for r in rows]),
            "status": np.asarray([r[4] for r in rows], dtype=object),
            "message": np.asarray([r[5] for r in rows], dtype=object),
            "ran_by": np.asarray([ran_by] * len(rows), dtype=object),
            "model_seconds": seconds,
            "graph_seconds": graphs,
        }


def commit(batch: dict, expected: dict, writer, summary, bar) -> None:
    """Write one batch of results from the cluster through the crash-safe writer.

    Refuses (:class:`ActorMismatchError`, before writing) a batch computed by
    anything else than what the run's fingerprint records.
    """
    for text in set(batch["ran_by"]):
        report = json.loads(text)
        check_ran_by(report, expected)
        summary.gpu = summary.gpu or report["gpu"]
    summary.model_seconds += float(np.sum(batch["model_seconds"]))
    summary.graph_seconds += float(np.sum(batch["graph_seconds"]))
    results, failed, atoms = [], [], 0
    for i, e, f, st, status, message in zip(
        batch["index"], batch["energy"], batch["forces"], batch["stress"], batch["status"], batch["message"]
    ):
        if len(f):
            forces = np.asarray(f)
            atoms += len(forces)
            results.append((int(i), float(e), forces, np.asarray(st) if len(st) else None, str(status)))
        else:
            failed.append((int(i), str(status), str(message)))
    writer.commit_results(results)
    writer.commit_status(failed)
    summary.computed += len(results) + len(failed)
    summary.atoms += atoms
    bar.update(len(results) + len(failed), atoms)


def check_ran_by(report: dict, expected: dict) -> None:
    """One line naming the actor's node and the first thing it ran differently from the driver."""
    for key, want in expected.items():
        if report.get(key) != want:
            raise ActorMismatchError(
                f"an actor on node {report.get('node', '?')} computed with {key}={report.get(key)!r}, "
                f"and this driver recorded {want!r}: run the same painn-export and model on every node"
            )
