"""``painn-batch``: evaluate a PaiNN on every structure of an HDF5 file, or relax them (``relax``).

Exit codes: 0 every structure ok (``relax``: converged); 3 finished but some structures failed
(see the output's ``status``); 1 fatal (unusable input, model or partial
file, a full disk); 2 usage, or a runtime or device this machine cannot give
(``--device cuda`` without a GPU for that runtime); 128 + the signal when stopped by one: 130
Ctrl-C, 143 SIGTERM, 129 SIGHUP (what was done is kept: rerun with --resume).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from painn_export.cli import GuardedGroup, device_option, unavailable
from painn_export.errors import one_line

EXIT_SOME_FAILED = 3


def _options(*decorators):
    """One decorator applying ``decorators`` in order (options shared by ``run`` and ``relax``)."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


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
        type=click.Choice(["torch", "onnxruntime", "tensorrt", "aoti"]),
        default="onnxruntime",
        show_default=True,
    ),
)
batch_options = _options(
    click.option(
        "--max-atoms", type=click.IntRange(min=1), default=4096, show_default=True, help="Atoms per batch."
    ),
    click.option(
        "--max-edges",
        type=click.IntRange(min=1),
        default=None,
        help="Padded edges per batch: atoms x neighbour slots per atom (default: no limit).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
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
def run_cmd(
    input_path,
    model_path,
    runtime,
    output,
    max_atoms,
    max_edges,
    workers,
    ray_address,
    ray_actors,
    ray_gpus_per_actor,
    ray_cpus_per_actor,
    ray_batch,
    device,
    resume,
    overwrite,
    as_json,
    verbose,
    quiet,
):
    """Compute energies and forces of every structure in INPUT_PATH."""
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    ray = None
    if ray_address is not None:
        from pipelines.ray_run import RayOptions, RayUnavailableError, import_ray

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
    from pipelines.run import default_workers, run_file

    output = output or str(input_path).removesuffix(".h5") + ".out.h5"
    _execute(
        lambda: run_file(
            input_path,
            output,
            model_path,
            runtime=runtime,
            device=device,
            max_atoms=max_atoms,
            max_edges=max_edges,
            workers=default_workers() if workers is None else workers,
            resume=resume,
            overwrite=overwrite,
            progress=False if quiet else None,
            ray=ray,
        ),
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
    from pipelines.output import ResumeError, partial_path
    from pipelines.ray_run import ClusterError
    from pipelines.run import RunInterruptedError, WorkerError

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
    default=0.05,
    show_default=True,
    help="Converged when the largest force on a free atom (and cell row with --cell) is below it, eV/Å.",
)
@click.option("--steps", type=click.IntRange(min=0), default=300, show_default=True, help="Most FIRE steps.")
@click.option("--cell", "relax_cell", is_flag=True, help="Relax the cell too (ASE's FrechetCellFilter).")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Model calls between checkpoints of the optimiser state (what --resume continues from).",
)
@click.option(
    "--trajectory-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Keep every Nth step's positions, cell, energy and fmax in the output (0: none).",
)
@batch_options
@control_options
def relax_cmd(
    input_path,
    model_path,
    runtime,
    output,
    fmax,
    steps,
    relax_cell,
    checkpoint_every,
    trajectory_every,
    max_atoms,
    max_edges,
    workers,
    device,
    resume,
    overwrite,
    as_json,
    verbose,
    quiet,
):
    """Relax every structure in INPUT_PATH with FIRE (ASE's), many structures per batch."""
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    from pipelines.relax import CellNeedsStressError, RelaxSettings, relax_file
    from pipelines.run import default_workers

    output = output or str(input_path).removesuffix(".h5") + ".relaxed.h5"
    settings = RelaxSettings(
        fmax=fmax,
        steps=steps,
        cell=relax_cell,
        checkpoint_every=checkpoint_every,
        trajectory_every=trajectory_every,
    )
    _execute(
        lambda: relax_file(
            input_path,
            output,
            model_path,
            settings=settings,
            runtime=runtime,
            device=device,
            max_atoms=max_atoms,
            max_edges=max_edges,
            workers=default_workers() if workers is None else workers,
            resume=resume,
            overwrite=overwrite,
            progress=False if quiet else None,
        ),
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
def export_cmd(result, input_path, output, prefix):
    """Write RESULT (a painn-batch output) with its input structures as extxyz."""
    from pipelines.convert import ConvertError, export_extxyz

    try:
        n = export_extxyz(result, input_path, output, prefix)
    except (ConvertError, ImportError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from exc
    click.echo(f"wrote {output}: {n} structures", err=True)
