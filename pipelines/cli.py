"""``painn-batch``: evaluate a PaiNN on every structure of an HDF5 file, or relax them (``relax``).

Exit codes: 0 every structure ok (``relax``: converged); 3 finished but some structures failed
(see the output's ``status``); 1 fatal (unusable input, model or partial
file, a full disk); 2 usage, or a runtime or device this machine cannot give
(``--device cuda`` without a GPU for that runtime); 128 + the signal when stopped by one: 130
Ctrl-C, 143 SIGTERM, 129 SIGHUP (what was done is kept: rerun with --resume).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

import click

from painn_export.cli import GuardedGroup, device_option, unavailable
from painn_export.errors import one_line
from painn_export.runners.base import RUNTIMES
from pipelines.options import RelaxSettings, RunOptions
from pipelines.report import DEFAULT_MAX_POINTS

EXIT_SOME_FAILED = 3


def _options(*decorators):
    """One decorator applying ``decorators`` in order (options shared by ``run`` and ``relax``)."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


_RUN_FIELDS = tuple(f.name for f in fields(RunOptions))


def _collect_run_options(fn):
    """Hand ``fn`` one frozen :class:`RunOptions` built from the run options it was given."""

    @functools.wraps(fn)
    def wrapper(**kwargs):
        given = {name: kwargs.pop(name) for name in _RUN_FIELDS if name in kwargs}
        if given.get("resume") and given.get("overwrite"):
            raise click.UsageError("give --resume or --overwrite, not both")
        if kwargs.get("quiet"):
            given["progress"] = False
        return fn(options=RunOptions(**given), **kwargs)

    return wrapper


model_options = _options(
    click.option(
        "--model",
        "model_path",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="A checkpoint, an exported .onnx file, an AOTInductor .pt2 or a TensorRT .engine "
        "(default: the bundled demo model).",
    ),
    click.option(
        "--runtime",
        type=click.Choice(RUNTIMES),
        default=RunOptions.runtime,
        help="Default: the model file's own (a checkpoint: onnxruntime; .onnx: onnxruntime; "
        ".pt2: aoti; .engine: tensorrt). A runtime that does not fit the file is refused.",
    ),
    click.option(
        "--dtype",
        type=click.Choice(["float32", "float64"]),
        default=RunOptions.dtype,
        help="A checkpoint's precision on its runtime (exported in it for onnxruntime and aoti). "
        "Default: the model file's own (a checkpoint: float32); an exported file in another is refused.",
    ),
)
batch_options = _options(
    click.option(
        "--max-atoms",
        type=click.IntRange(min=1),
        default=RunOptions.max_atoms,
        show_default=True,
        help="Atoms per batch.",
    ),
    click.option(
        "--max-edges",
        type=click.IntRange(min=1),
        default=RunOptions.max_edges,
        help="Padded edges per batch: atoms x neighbour slots per atom (default: no limit).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=RunOptions.workers,
        help="Neighbour-list worker processes (0: in the main process). Default: spare cores, 1 to 4.",
    ),
)
control_options = _options(
    device_option("Where the runtime runs (auto: a GPU where this runtime can use one, else the CPU)."),
    click.option("--resume", is_flag=True, help="Continue OUT.partial.h5 (same input, model and settings)."),
    click.option("--overwrite", is_flag=True, help="Start over, replacing OUT and OUT.partial.h5."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout."),
    click.option("-v", "--verbose", count=True, help="More log output (-vv: debug)."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar, only errors."),
)


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="painn-export")
def main() -> None:
    """Batch evaluation of PaiNN models over HDF5 structure files."""


@main.command("run")
@click.argument("input_path", type=click.Path(dir_okay=False))
@model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Default: INPUT with .out.h5.")
@batch_options
@click.option(
    "--ray",
    "ray_address",
    metavar="local|auto|ADDRESS",
    default=None,
    help="Run the graphs and the inference on Ray (local: start Ray here; auto: this machine's cluster).",
)
@click.option(
    "--ray-actors", type=click.IntRange(min=1), default=1, show_default=True, help="Inference actors."
)
@click.option(
    "--ray-gpus-per-actor",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs per actor.",
)
@click.option(
    "--ray-cpus-per-actor",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPUs per actor: its runtime's threads.",
)
@click.option(
    "--ray-batch",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Structures per actor call.",
)
@control_options
@_collect_run_options
def run_cmd(
    input_path,
    model_path,
    output,
    ray_address,
    ray_actors,
    ray_gpus_per_actor,
    ray_cpus_per_actor,
    ray_batch,
    options,
    as_json,
    verbose,
    quiet,
):
    """Compute energies and forces of every structure in INPUT_PATH."""
    ray = None
    if ray_address is not None:
        from pipelines.ray_cluster import RayOptions, RayUnavailableError, import_ray

        try:
            import_ray()
        except RayUnavailableError as exc:
            raise click.UsageError(str(exc)) from exc
        ray = RayOptions(
            ray_address,
            ray_actors,
            ray_gpus_per_actor,
            actor_batch=ray_batch,
            cpus_per_actor=ray_cpus_per_actor,
        )
    from pipelines.run import run_file

    output = output or str(input_path).removesuffix(".h5") + ".out.h5"
    _execute(
        lambda: run_file(input_path, output, model_path, options=options, ray=ray),
        output,
        as_json=as_json,
        verbose=verbose,
        quiet=quiet,
        describe=lambda r: f"{r['structures_per_s']} structures/s",
    )


def _execute(work, output, *, as_json, verbose, quiet, describe, unavailable_errors=()) -> None:
    """Run ``work`` (a run or a relaxation) and report as every painn-batch command does.

    One line and the exit code for each kind of failure (a stop signal: 128 +
    the signal; a runtime or device this machine cannot give, and
    ``unavailable_errors``: 2; bad input or files: 1; a failure midway: 1,
    naming the partial output to resume); then the JSON summary or one line
    (``describe`` adds the command's own rate), and exit 3 if some structure failed.
    """
    from painn_export.errors import InferenceError, RuntimeUnavailableError
    from painn_export.schema import SchemaError
    from pipelines.graphs import WorkerError
    from pipelines.output import ResumeError, RunInterruptedError, partial_path
    from pipelines.ray_cluster import ClusterError

    level = logging.ERROR if quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = work()
    except RunInterruptedError as exc:
        click.echo(f"painn-batch: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (RuntimeUnavailableError, *unavailable_errors) as exc:  # exit 2, one line
        unavailable(one_line(exc, limit=None))
    except (SchemaError, ResumeError, ValueError, FileNotFoundError, ImportError) as exc:
        raise click.ClickException(one_line(exc, limit=None)) from exc
    # OSError: a full disk, a file system gone; ClusterError: a Ray node that differs from the driver
    except (InferenceError, WorkerError, ClusterError, OSError) as exc:
        partial = partial_path(Path(output))
        kept = f"; what was computed is kept in {partial}: fix the cause, then rerun with --resume"
        raise click.ClickException(one_line(exc) + (kept if partial.exists() else "")) from exc
    report = summary.as_dict()
    if as_json:
        click.echo(json.dumps(report, allow_nan=False))
    elif not quiet:
        click.echo(
            f"wrote {output}: {report['status_counts']} in {report['seconds']} s "
            f"({describe(report)}, {report['runtime']} on {report['device']})",
            err=True,
        )
    if not summary.all_ok:
        sys.exit(EXIT_SOME_FAILED)


@main.command("relax")
@click.argument("input_path", type=click.Path(dir_okay=False))
@model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Default: INPUT with .relaxed.h5.")
@click.option(
    "--fmax",
    type=click.FloatRange(min=0, min_open=True),
    default=RelaxSettings.fmax,
    show_default=True,
    help="Converged when the largest force on a free atom (and cell row with --cell) is below it, eV/Å.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=RelaxSettings.steps,
    show_default=True,
    help="Most FIRE steps.",
)
@click.option("--cell", "relax_cell", is_flag=True, help="Relax the cell too (ASE's FrechetCellFilter).")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=RelaxSettings.checkpoint_every,
    show_default=True,
    help="Model calls between checkpoints of the optimiser state (what --resume continues from).",
)
@click.option(
    "--trajectory-every",
    type=click.IntRange(min=0),
    default=RelaxSettings.trajectory_every,
    show_default=True,
    metavar="N",
    help="Keep every Nth step's positions, cell, energy and fmax in the output (0: none).",
)
@batch_options
@control_options
@_collect_run_options
def relax_cmd(
    input_path,
    model_path,
    output,
    fmax,
    steps,
    relax_cell,
    checkpoint_every,
    trajectory_every,
    options,
    as_json,
    verbose,
    quiet,
):
    """Relax every structure in INPUT_PATH with FIRE (ASE's), many structures per batch."""
    from pipelines.relax import CellNeedsStressError, relax_file

    output = output or str(input_path).removesuffix(".h5") + ".relaxed.h5"
    settings = RelaxSettings(
        fmax=fmax,
        steps=steps,
        cell=relax_cell,
        checkpoint_every=checkpoint_every,
        trajectory_every=trajectory_every,
    )
    _execute(
        lambda: relax_file(input_path, output, model_path, settings=settings, options=options),
        output,
        as_json=as_json,
        verbose=verbose,
        quiet=quiet,
        describe=lambda r: f"{r['steps']} steps, {r['us_per_atom_step']} us/atom/step",
        unavailable_errors=(CellNeedsStressError,),
    )


@main.command("convert")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Schema file to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "ase", "ani", "spice"]),
    default="auto",
    show_default=True,
    help="ase: any file ASE reads; ani/spice: those HDF5 layouts (hartree, bohr converted).",
)
@click.option("--energy-key", help="ASE: atoms.info key; ANI/SPICE: dataset name in each group.")
@click.option("--forces-key", help="ASE: atoms.arrays key; ANI: forces dataset; SPICE: gradient dataset.")
def convert_cmd(source, output, fmt, energy_key, forces_key):
    """Convert SOURCE (extxyz, traj, ASE db, ANI or SPICE HDF5) into the painn-batch input schema."""
    from pipelines.convert import ConvertError, convert

    try:
        n = convert(source, output, fmt=fmt, energy_key=energy_key, forces_key=forces_key)
    except (ConvertError, ImportError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(f"wrote {output}: {n} structures", err=True)


@main.command("export")
@click.argument("result", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="extxyz file to write.")
@click.option("--prefix", default="painn_", show_default=True, help="Prefix of the result keys.")
@click.option(
    "--index",
    "indices",
    metavar="I,J,...",
    help="Only these structures (0-based indices, comma-separated; painn-batch report lists them).",
)
def export_cmd(result, input_path, output, prefix, indices):
    """Write RESULT (a painn-batch output) with its input structures as extxyz."""
    from pipelines.convert import ConvertError, export_extxyz

    try:
        chosen = [int(i) for i in indices.split(",")] if indices else None
    except ValueError as exc:
        raise click.BadParameter(f"{indices!r}: give integers and commas", param_hint="--index") from exc
    try:
        n = export_extxyz(result, input_path, output, prefix, chosen)
    except (ConvertError, ImportError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(f"wrote {output}: {n} structures", err=True)


@main.command("report")
@click.argument("output_path", metavar="OUT.h5", type=click.Path(dir_okay=False))
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    help="The file OUT.h5 was computed from (checked): per-atom figures, errors against its labels, ids.",
)
@click.option(
    "--output",
    "-o",
    "folder",
    type=click.Path(),
    help="Report folder (default: OUT.report); an earlier report there is replaced.",
)
@click.option(
    "--max-points",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_POINTS,
    show_default=True,
    help="Points in a scatter plot; past that, a 2-D histogram.",
)
@click.option(
    "--list-ids",
    "status",
    metavar="STATUS",
    help="Instead of a report, print the index, id and message of each structure with STATUS.",
)
def report_cmd(output_path, input_path, folder, max_points, status):
    """Write a report of OUT.h5 (a run or relax output): index.html, one PNG per figure, report.json."""
    from pipelines.report import ReportError, list_ids, write_report

    try:
        if status:
            for index, name, message in list_ids(output_path, status, input_path):
                click.echo(f"{index}\t{name}\t{message}")
            return
        index = write_report(output_path, input_path, folder, max_points=max_points)
    except ReportError as exc:
        raise click.ClickException(one_line(exc, limit=None)) from exc
    click.echo(f"wrote {index}", err=True)
