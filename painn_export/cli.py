"""``painn-export``: export to ONNX, build TensorRT engines, check parity.

Each command parses its options and calls one library function; errors the
user can fix are one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations

import json
import sys

import click

from painn_export.graphs_where import GRAPHS

EXIT_PARITY_FAILED = 1
EXIT_UNAVAILABLE = 2  # a runtime or device that this machine cannot give


def device_option(help_text: str):
    from painn_export.runners import DEVICES

    return click.option(
        "--device",
        default="auto",
        show_default=True,
        metavar=DEVICES,
        callback=_check_device,
        help=help_text,
    )


def _check_device(ctx, param, value: str) -> str:
    from painn_export.runners import parse_device

    try:
        parse_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


def unavailable(exc: Exception | str):
    """A runtime or device this machine cannot give: one line, exit 2 (never a silent CPU fallback)."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_UNAVAILABLE)


def _load(checkpoint: str | None, random_init: str | None, scale_file: str | None, trust: bool):
    import torch

    from painn_export.checkpoint import CheckpointError, load_model
    from painn_export.config import PRESETS
    from painn_export.model import PaiNN

    if checkpoint and random_init:
        raise click.UsageError("give --checkpoint or --random-init, not both")
    if checkpoint:
        try:
            return load_model(checkpoint, scale_file=scale_file, trusted=trust)
        except (CheckpointError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    if random_init:
        # The same weights every time, so export and parity agree; the caller's RNG is left as it was.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = PaiNN(PRESETS[random_init]).eval()
        model.provenance = {"source_format": f"random-init:{random_init}:seed0"}
        return model
    from painn_export.demo import demo_model_path

    click.echo("no --checkpoint: using the bundled demo model (PaiNN trained on EMT)", err=True)
    return load_model(demo_model_path())


model_options = [
    click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False),
        help="OCP/fairchem checkpoint or native model file (default: the bundled demo model).",
    ),
    click.option(
        "--random-init", type=click.Choice(["demo", "ocp"]), help="Random weights of a preset size (seed 0)."
    ),
    click.option(
        "--scale-file", type=click.Path(exists=True, dir_okay=False), help="Separate scale factors (old OCP)."
    ),
    click.option("--trust-checkpoint", is_flag=True, help="Allow full unpickling of a checkpoint you trust."),
]


def with_model_options(fn):
    for option in reversed(model_options):
        fn = option(fn)
    return fn


class GuardedGroup(click.Group):
    """A command group whose unexpected errors are one line, not a traceback.

    Errors the commands expect are ClickExceptions with their own advice;
    anything else is reported by type and message (``PAINN_DEBUG=1`` shows
    the traceback, for a bug report).
    """

    def invoke(self, ctx: click.Context):
        import os

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("PAINN_DEBUG"):
                raise
            from painn_export.errors import one_line

            raise click.ClickException(
                f"{type(exc).__name__}: {one_line(exc)} (set PAINN_DEBUG=1 to see where)"
            ) from exc


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="painn-export")
def main() -> None:
    """Export PaiNN models to ONNX and TensorRT, and check runtimes agree."""


@main.command("onnx")
@with_model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="model.onnx", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="float16/bfloat16: the network in that dtype; inputs, geometry and outputs stay float32 "
    "(for TensorRT engines: painn-export trt builds them strongly typed).",
)
@click.option(
    "--stress",
    is_flag=True,
    help="Add a per-atom virial output, for the stress (eV/Å^3); gradient-force models only.",
)
@click.option("--skip-check", is_flag=True, help="Do not run the ONNX Runtime parity check after writing.")
@device_option("Where ONNX Runtime runs the check (auto: CUDA when onnxruntime-gpu has it).")
def onnx_cmd(
    checkpoint, random_init, scale_file, trust_checkpoint, output, opset, dtype, stress, skip_check, device
):
    """Trace the model to ONNX (dynamic atoms and slots), then check it in ONNX Runtime.

    The checkpoint decides the graph: a direct-force model exports its
    forward pass; a gradient-force model (direct_forces=False) exports forward
    and backward, forces = -dE/dx.
    """
    import torch

    from painn_export.export import export_onnx
    from painn_export.parity import format_table, run_parity
    from painn_export.runners import OnnxRuntimeRunner
    from painn_export.samples import example_set

    model = _load(checkpoint, random_init, scale_file, trust_checkpoint)
    if stress and model.config.direct_forces:
        from painn_export.contract import STRESS_NEEDS_GRADIENT

        raise click.UsageError(f"--stress: {STRESS_NEEDS_GRADIENT}; this checkpoint has a direct force head")
    path = export_onnx(model, output, opset=opset, dtype=getattr(torch, dtype), stress=stress)
    forces = "direct" if model.config.direct_forces else "gradient (-dE/dx)"
    click.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset}, {dtype}, {forces} forces, "
        "no scatter" + (", stress" if stress else "") + ")"
    )
    if skip_check:
        return
    from painn_export.errors import RuntimeUnavailableError

    samples = example_set(num_elements=model.config.num_elements, large=PARITY_LARGE)
    try:
        rows = run_parity(model, [(OnnxRuntimeRunner(path, device=device), dtype)], samples)
    except RuntimeUnavailableError as exc:
        unavailable(exc)
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc):  # onnxruntime's words for a kernel it lacks
            raise
        from painn_export.errors import one_line

        unavailable(
            f"{path} is written, but onnxruntime cannot run a {dtype} graph on --device {device} "
            f"({one_line(exc, 160)}); check it on a GPU (painn-export trt, then parity --engine), "
            "or pass --skip-check"
        )
    click.echo(format_table(rows))
    _exit_on_failure(rows)


@main.command("aoti")
@with_model_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="model.pt2", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--stress", is_flag=True, help="Add the per-atom virial (stress); gradient-force models only.")
def aoti_cmd(checkpoint, random_init, scale_file, trust_checkpoint, output, device, dtype, stress):
    """Compile the model ahead of time (AOTInductor) into a .pt2 package, checked against eager."""
    import time

    import torch

    from painn_export.aoti import export_aoti
    from painn_export.errors import RuntimeUnavailableError

    model = _load(checkpoint, random_init, scale_file, trust_checkpoint)
    if stress and model.config.direct_forces:
        from painn_export.contract import STRESS_NEEDS_GRADIENT

        raise click.UsageError(f"--stress: {STRESS_NEEDS_GRADIENT}; this checkpoint has a direct force head")
    start = time.perf_counter()
    try:
        path = export_aoti(model, output, device=device, stress=stress, dtype=getattr(torch, dtype))
    except RuntimeUnavailableError as exc:
        unavailable(exc)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {device}, {dtype}"
        + (", stress" if stress else "")
        + f", compiled and checked against eager in {time.perf_counter() - start:.0f} s)"
    )


# Atoms of the bulk cell that every parity run adds: thousands of edges.
PARITY_LARGE = 256


def _exit_on_failure(rows) -> None:
    from painn_export.parity import nondeterministic

    racy = nondeterministic(rows)
    if racy:
        names = sorted({r.runtime for r in racy})
        click.echo(f"error: non-deterministic: {', '.join(names)} gave two answers to one input", err=True)
    if not all(r.comparison.passed for r in rows):
        click.echo("error: a runtime disagrees with PyTorch float64 beyond tolerance", err=True)
        sys.exit(EXIT_PARITY_FAILED)


@main.command("trt")
@click.argument("onnx_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="model.engine", show_default=True)
@click.option("--min-atoms", type=int, multiple=True, help="Per profile; repeat for several profiles.")
@click.option("--opt-atoms", type=int, multiple=True)
@click.option(
    "--max-atoms", type=int, multiple=True, help="Default: painn-batch's default --max-atoms (4096)."
)
@click.option("--min-slots", type=int, multiple=True, help="Neighbour slots per atom (contract n_slots).")
@click.option("--opt-slots", type=int, multiple=True)
@click.option("--max-slots", type=int, multiple=True)
@click.option(
    "--fp16",
    is_flag=True,
    help="TensorRT 10 and a float32 file only: allow fp16 kernels. TensorRT 11 (strongly typed): "
    "export with painn-export onnx --dtype float16 instead.",
)
@click.option("--tf32/--no-tf32", default=True, show_default=True, help="Allow TF32 matmuls.")
@click.option("--workspace", type=float, default=4.0, show_default=True, help="Builder workspace, GiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Read and update this timing cache.")
def trt_cmd(onnx_path, output, fp16, tf32, workspace, timing_cache, **ranges):
    """Build a TensorRT engine (with a JSON sidecar) from an exported ONNX file.

    TensorRT 11 builds strongly typed networks: the engine's precision is the
    file's (painn-export onnx --dtype float16 / bfloat16). TensorRT 10 builds
    a float32 file weakly typed (--tf32, --fp16) and a float16/bfloat16 file
    strongly typed.
    """
    from painn_export.errors import RuntimeUnavailableError
    from painn_export.trt import build_engine, read_sidecar

    try:
        profiles = _profiles(ranges)
        path = build_engine(
            onnx_path,
            output,
            profiles,
            fp16=fp16,
            tf32=tf32,
            workspace_gib=workspace,
            timing_cache=timing_cache,
        )
    except RuntimeUnavailableError as exc:
        unavailable(exc)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    side = read_sidecar(path)
    click.echo(
        f"wrote {path} and {path}.json ({len(profiles)} profile(s), {side['precision']}, "
        f"{'strongly' if side['strongly_typed'] else 'weakly'} typed, TensorRT {side['tensorrt_version']}; "
        f"a context needs {side['device_memory_bytes'] / (1 << 20):.0f} MiB of device memory)"
    )


def _profiles(ranges: dict) -> list:
    """trtexec-style ranges: the k-th value of each option belongs to profile k."""
    from painn_export.trt import Profile

    count = max([len(v) for v in ranges.values()] + [1])
    default = Profile()
    profiles = []
    for k in range(count):
        fields = {}
        for axis in ("atoms", "slots"):
            values = []
            for i, bound in enumerate(("min", "opt", "max")):
                given = ranges[f"{bound}_{axis}"]
                if given and len(given) not in (1, count):
                    raise ValueError(f"--{bound}-{axis} given {len(given)} times for {count} profiles")
                values.append(given[k if len(given) > 1 else 0] if given else getattr(default, axis)[i])
            fields[axis] = tuple(values)
        profiles.append(Profile(**fields))
    return profiles


@main.command("parity")
@with_model_options
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), help="Exported ONNX file.")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False), help="TensorRT engine.")
@click.option("--pt2", type=click.Path(exists=True, dir_okay=False), help="AOTInductor package.")
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Structures in the painn-batch HDF5 schema (default: generated ones).",
)
@click.option("--limit", type=int, default=64, show_default=True, help="Structures read from --input.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated structures.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    help="Also write a report folder: index.html, one PNG per figure, report.json.",
)
@device_option("Where PyTorch float32 and ONNX Runtime run (cuda: PyTorch float64 on the GPU too).")
@click.option(
    "--graphs",
    type=click.Choice(GRAPHS),
    default="host",
    show_default=True,
    help="Where each runtime's graphs and feed are built: host, device (its device; needs "
    "painn-export[device-graphs]) or auto (device for a runtime on a GPU). The truth is fed host graphs.",
)
def parity_cmd(
    checkpoint,
    random_init,
    scale_file,
    trust_checkpoint,
    onnx_path,
    engine,
    pt2,
    input_path,
    limit,
    seed,
    as_json,
    report_dir,
    device,
    graphs,
):
    """Run every available runtime on the same structures against PyTorch float64, twice each.

    A runtime that gives two different answers to the same input is reported
    as non-deterministic, whatever its distance from PyTorch.
    """
    from painn_export.errors import RuntimeUnavailableError
    from painn_export.parity import format_table, run_parity
    from painn_export.runners import TorchRunner, open_runner
    from painn_export.samples import example_set

    model = _load(checkpoint, random_init, scale_file, trust_checkpoint)
    stress = model.gradient_forces
    runners = [(TorchRunner(model, device=device, dtype="float32", stress=stress), "float32")]
    if device.startswith("cuda"):
        runners.append((TorchRunner(model, device=device, dtype="float64", stress=stress), "float64"))
    try:
        if onnx_path:
            runner, facts = open_runner(onnx_path, "onnxruntime", device=device)
            runners.append((runner, facts.precision))
        if engine:
            runner, _ = open_runner(engine, "tensorrt", device=device)
            runners.append((runner, runner.precision.replace("fp32", "float32")))
        if pt2:
            runner, facts = open_runner(pt2, "aoti", device=device)
            runners.append((runner, facts.precision))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if input_path:
        from painn_export.schema import SchemaError, read_structures

        try:
            samples = read_structures(input_path, limit)
        except SchemaError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        samples = example_set(seed=seed, num_elements=model.config.num_elements, large=PARITY_LARGE)
    try:
        rows = run_parity(model, runners, samples, graphs=graphs)
    except RuntimeUnavailableError as exc:
        unavailable(exc)
    if report_dir:
        from painn_export.parity_report import write_parity_report
        from painn_export.plots import ReportError

        try:
            index = write_parity_report(rows, [s.name for s in samples], report_dir)
        except ReportError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"wrote {index}", err=True)
    passed = all(r.comparison.passed for r in rows)
    if as_json:
        from painn_export.parity import nondeterministic

        racy = sorted({r.runtime for r in nondeterministic(rows)})
        click.echo(
            json.dumps(
                {"passed": passed, "nondeterministic": racy, "rows": [r.as_dict() for r in rows]}, indent=2
            )
        )
        if not passed:
            sys.exit(EXIT_PARITY_FAILED)
        return
    click.echo(format_table(rows))
    _exit_on_failure(rows)


@main.command("check-ops")
@click.argument("onnx_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--table",
    type=click.Path(exists=True, dir_okay=False),
    help="TensorRT operator facts (JSON) or onnx-tensorrt docs/operators.md of another release "
    "(default: the bundled TensorRT 10.1 facts).",
)
def check_ops_cmd(onnx_path, table):
    """Check every node of ONNX_PATH against TensorRT's ONNX-parser operator facts."""
    from painn_export.opcheck import check_model, load_facts

    try:
        _, _, source = load_facts(table)
        report = check_model(onnx_path, table)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in report.violations:
        click.echo(f"violation: {line}")
    for line in report.unchecked:
        click.echo(f"unchecked: {line}")
    click.echo(
        f"{sum(report.operators.values())} nodes, {len(report.operators)} operator types, against {source}: "
        + ("ok" if report.ok else f"{len(report.violations)} violation(s)")
    )
    if not report.ok:
        sys.exit(1)
