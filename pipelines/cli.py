"""``painn-batch``: evaluate a PaiNN on every structure of an HDF5 file."""

from __future__ import annotations

import json
import sys

import click

EXIT_SOME_FAILED = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batch evaluation of PaiNN models over HDF5 structure files."""


@main.command("run")
@click.argument("input_path", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A checkpoint, an exported .onnx file or a TensorRT .engine (default: the bundled demo model).",
)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Default: INPUT with .out.h5.")
@click.option(
    "--max-atoms",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Atom budget of one batch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def run_cmd(input_path, model_path, runtime, output, max_atoms, as_json):
    """Compute energies and forces of every structure in INPUT_PATH."""
    from pipelines.run import run_file
    from pipelines.schema import SchemaError

    output = output or str(input_path).removesuffix(".h5") + ".out.h5"
    try:
        summary = run_file(input_path, output, model_path, runtime=runtime, max_atoms=max_atoms)
    except (SchemaError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = summary.as_dict()
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"wrote {output}: {report['status_counts']} in {report['seconds']} s", err=True)
    ok = report["status_counts"].get("ok", 0)
    if ok != summary.n_structures:
        sys.exit(EXIT_SOME_FAILED)
