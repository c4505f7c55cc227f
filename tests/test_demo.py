"""The bundled demo model: package data, default model of both CLIs, accuracy on the examples."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from painn_export.checkpoint import load_model
from painn_export.cli import main as export_main
from painn_export.demo import demo_model_path
from painn_export.metadata import read_metadata
from pipelines.cli import main as batch_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "emt_examples.h5"
# Issue targets on held-out EMT structures.
ENERGY_MAE_TARGET = 0.015  # eV/atom
FORCES_MAE_TARGET = 0.08  # eV/Å


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp_path / "cache"))


def test_demo_model_is_small_package_data_with_a_card():
    path = demo_model_path()
    assert path.stat().st_size < 2_000_000
    assert (path.parent / "demo.md").is_file()
    model = load_model(path)
    assert model.config.direct_forces and model.config.cutoff == 6.0


def test_examples_are_held_out_emt_structures_with_labels():
    with h5py.File(EXAMPLES) as fh:
        assert fh["atom_offset"].shape[0] - 1 == 100
        assert "energy" in fh and "forces" in fh
        assert fh["positions"].attrs["units"] == "Angstrom"


def test_default_run_meets_the_accuracy_targets(tmp_path):
    """`painn-batch run examples/emt_examples.h5 --json`: demo model on ONNX Runtime CPU."""
    result = CliRunner().invoke(batch_main, ["run", str(EXAMPLES), "-o", str(tmp_path / "out.h5"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["status_counts"] == {"ok": 100}
    assert summary["energy_mae_eV_per_atom"] <= ENERGY_MAE_TARGET, summary
    assert summary["forces_mae_eV_per_A"] <= FORCES_MAE_TARGET, summary


def test_onnx_command_defaults_to_the_demo_model(tmp_path):
    out = tmp_path / "demo.onnx"
    result = CliRunner().invoke(export_main, ["onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(read_metadata(out)["painn_export.config"])["hidden_channels"] == 96


def test_readme_and_make_demo_commands_run_in_a_bare_copy(tmp_path):
    """`make demo`'s command line and the README's commands (run, then report), from a copy with nothing
    beside it."""
    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "alone" / "p"
    shutil.copytree(repo / "examples", copy / "examples")
    bindir = Path(sys.executable).parent
    recipe = (repo / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1].strip()
    assert recipe.startswith("$(VENV)/bin/painn-batch run examples/"), recipe
    env = {**os.environ, "PAINN_EXPORT_CACHE": str(tmp_path / "cache")}
    readme_main = (
        "painn-batch run examples/emt_examples.h5 --output out/emt_examples.out.h5 --json --overwrite"
    )
    assert readme_main in (repo / "README.md").read_text()
    for line in (recipe.replace("$(VENV)/bin/", ""), readme_main):
        argv = shlex.split(line)
        proc = subprocess.run(
            [str(bindir / argv[0]), *argv[1:]], cwd=copy, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
        assert json.loads(proc.stdout.strip().splitlines()[-1])["status_counts"] == {"ok": 100}
        assert "Traceback" not in proc.stderr and "onnx_ir" not in proc.stderr, proc.stderr[-2000:]
    assert (copy / "out" / "emt_examples.out.h5").is_file()
    # the README's next line, on what the run wrote
    report = ["painn-batch", "report", "out/emt_examples.out.h5", "--input", "examples/emt_examples.h5"]
    assert " ".join(report) in (repo / "README.md").read_text()
    proc = subprocess.run(
        [str(bindir / report[0]), *report[1:]], cwd=copy, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and (copy / "out" / "emt_examples.out.report" / "index.html").is_file(), (
        proc.stderr
    )


def test_a_killed_export_leaves_no_stale_file_in_the_cache(tmp_path):
    """A temporary file of an export whose process is gone (on this host) is removed by the next
    export; another host's is left alone."""
    import socket

    from painn_export.checkpoint import load_model
    from painn_export.demo import cached_onnx, demo_model_path

    source = demo_model_path()
    model = load_model(source)
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(proc.stdout)  # that process has exited
    path = cached_onnx(model, source)  # PAINN_EXPORT_CACHE is this test's folder
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    stale = path.with_name(f"{path.name}.{host}-{dead_pid}-0a1b2c3d.tmp")
    # another host's export in progress, on a shared cache: its pid means nothing here
    elsewhere = path.with_name(f"{path.name}.other_node-{dead_pid}-0a1b2c3d.tmp")
    stale.write_bytes(b"half an export")
    elsewhere.write_bytes(b"an export in progress on another node")
    path.unlink()
    assert cached_onnx(model, source) == path and path.is_file()
    assert not stale.exists() and elsewhere.exists()
