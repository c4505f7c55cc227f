"""What `painn-batch run` and `relax` are asked to do, in one frozen object: each default written once.

The CLI's option groups build it (:mod:`pipelines.cli`), the library takes
it (:func:`pipelines.run.run_file`, :func:`pipelines.relax.relax_file`),
and a script may pass its fields as keywords instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from painn_export.graphs_where import GRAPHS
from painn_export.trt import DEFAULT_MAX_ATOMS
from pipelines.fire import FireParams

SKIN = 1.0  # Å: Verlet skin of each structure's neighbour list


@dataclass(frozen=True)
class RunOptions:
    """The model, the batches and the output of a run or a relaxation."""

    runtime: str | None = None  # torch, onnxruntime, tensorrt, aoti; None: the model file's own
    device: str = "auto"  # auto, cpu, cuda, cuda:N: where the runtime runs
    dtype: str | None = None  # float32, float64: a checkpoint's precision (None: the model file's own)
    max_atoms: int = DEFAULT_MAX_ATOMS  # atoms per batch
    max_edges: int | None = None  # padded edges per batch (atoms x slots per atom); None: no limit
    workers: int | None = (
        None  # neighbour-list worker processes (0: in the main one); None: default_workers()
    )
    # Where neighbour graphs and the feed are built: host (neighbour workers), device (the
    # runtime's device, painn_export.device_graphs), auto (device when the runtime runs on a GPU
    # and device graphs are installed, else host). Bitwise the same results either way.
    graphs: str = "auto"
    resume: bool = False  # continue OUT.partial.h5 (same input, model and settings)
    overwrite: bool = False  # start over, replacing OUT and OUT.partial.h5
    progress: bool | None = None  # a progress bar (None: when stderr is a terminal)

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError("give --resume or --overwrite, not both")
        if self.graphs not in GRAPHS:
            raise ValueError(f"--graphs must be one of {', '.join(GRAPHS)}, got {self.graphs!r}")
        if self.max_atoms < 1 or (self.max_edges is not None and self.max_edges < 1):
            raise ValueError(
                f"--max-atoms and --max-edges must be at least 1, got {self.max_atoms}, {self.max_edges}"
            )

    @classmethod
    def of(cls, options: RunOptions | None = None, **changes) -> RunOptions:
        """``options`` (default: every default) with ``changes``; an unknown name is a TypeError."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown run options {sorted(unknown)}")
        return replace(options or cls(), **changes)

    @property
    def neighbour_workers(self) -> int:
        from pipelines.graphs import default_workers

        return default_workers() if self.workers is None else self.workers


@dataclass(frozen=True)
class RelaxSettings:
    """What decides a relaxation: convergence, steps, the cell, checkpoints, trajectory, skin."""

    fmax: float = 0.05  # eV/Å (and eV on the cell rows with cell=True)
    steps: int = 300  # most FIRE steps per structure
    cell: bool = False  # relax the cell too (FrechetCellFilter)
    fire: FireParams = field(default_factory=FireParams)
    checkpoint_every: int = 20  # model calls between checkpoints of the optimiser state
    trajectory_every: int = 0  # keep every Nth step's geometry and energy (0: none)
    skin: float = SKIN  # Å

    def __post_init__(self) -> None:
        """Refuse what no relaxation can mean, in one line each (the CLI shows it as a usage error)."""
        import math

        if not (math.isfinite(self.fmax) and self.fmax > 0):
            raise ValueError(
                f"--fmax must be a finite force above 0 eV/Å, got {self.fmax} "
                "(nan never converges; inf converges at step 0)"
            )
        if self.steps < 0:
            raise ValueError(f"--steps must be at least 0, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.trajectory_every < 0:
            raise ValueError(f"--trajectory-every must be at least 0 (0: none), got {self.trajectory_every}")
        if not (math.isfinite(self.skin) and self.skin >= 0):
            raise ValueError(f"the neighbour-list skin must be a finite length >= 0 Å, got {self.skin}")
        fire = self.fire
        for name in ("dt", "maxstep", "dtmax", "finc", "fdec", "astart", "fa", "a"):
            value = getattr(fire, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"FIRE's {name} must be finite and above 0, got {value}")
