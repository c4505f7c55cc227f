"""``painn-batch report`` and ``painn-export parity --report``: the page, its figures and its numbers.

On the bundled demo (a run with reference labels, a relaxation with a
trajectory): every figure exists, decodes as PNG, is not blank and carries
the numbers report.json holds; the MAE equals ``painn-batch run --json``'s;
the worst structures' export command pulls exactly them out. Streaming
(many small chunks, binned scatter plots) gives the numbers of one pass over
everything; partial outputs and the three bad inputs behave as documented.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from painn_export.plots import ReportError, number, report_folder
from pipelines.cli import main as batch_main
from pipelines.output import STATUS, STATUS_MEANING
from pipelines.report import write_report

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "emt_examples.h5"
RELAX_EXAMPLES = ROOT / "examples" / "emt_relax_examples.h5"


def _with_own_cache(folder: Path, make):
    """``make()`` with the export cache in ``folder`` (module-scoped fixtures have no monkeypatch)."""
    env = pytest.MonkeyPatch()
    env.setenv("PAINN_EXPORT_CACHE", str(folder / "cache"))
    try:
        return make()
    finally:
        env.undo()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run through the CLI, as a user makes it: its output and its --json summary."""
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "out.h5"
    args = ["run", str(EXAMPLES), "-o", str(out), "--json", "--workers", "0", "-q"]
    result = _with_own_cache(folder, lambda: CliRunner().invoke(batch_main, args))
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def relaxed(tmp_path_factory):
    from pipelines.relax import RelaxSettings, relax_file

    folder = tmp_path_factory.mktemp("relax")
    out = folder / "relaxed.h5"
    settings = RelaxSettings(trajectory_every=5)
    summary = _with_own_cache(
        folder, lambda: relax_file(RELAX_EXAMPLES, out, settings=settings, workers=0, progress=False)
    )
    return out, summary


def _load(index: Path) -> tuple[dict, str]:
    return json.loads((index.parent / "report.json").read_text()), index.read_text(encoding="utf-8")


def check_figures(index: Path) -> dict:
    """Every figure: a PNG file that decodes, is not blank, carries its numbers; the page shows it."""
    from PIL import Image

    report, page = _load(index)
    assert report["figures"]
    for fig in report["figures"]:
        path = index.parent / fig["file"]
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (640, 480), fig["file"]
            pixels = np.asarray(im.convert("L"), dtype=np.float64)
        drawn = pixels < 250  # not white
        assert 0.01 < drawn.mean() < 0.9, (fig["file"], drawn.mean())
        # Something beyond axes and text: more than one shade of grey.
        assert len(np.unique(pixels)) > 20, fig["file"]
        for n in fig["numbers"]:  # in an annotation ("MAE: 0.02 eV/Å"), or a bar's label and value
            in_box = any(n["text"] in t.splitlines() for t in fig["texts"])
            on_bar = n["label"] in fig["texts"] and number(n["value"]) in fig["texts"]
            assert in_box or on_bar, (fig["file"], n, fig["texts"])
        assert f'src="{fig["file"]}"' in page
    assert "http://" not in page and "https://" not in page
    return report


def _number(report: dict, figure: str, label: str) -> float:
    fig = next(f for f in report["figures"] if f["file"] == f"{figure}.png")
    return next(n["value"] for n in fig["numbers"] if n["label"] == label)


def test_every_status_has_its_meaning():
    assert set(STATUS_MEANING) == set(STATUS)


def test_run_report_on_the_demo(demo, tmp_path):
    out, summary = demo
    index = write_report(out, EXAMPLES, tmp_path / "report")
    report = check_figures(index)
    _, page = _load(index)
    assert {f["file"] for f in report["figures"]} == {
        f"{name}.png"
        for name in (
            "energy_parity",
            "force_parity",
            "energy_error",
            "force_error",
            "force_mae_per_element",
            "energy_per_atom",
            "largest_force",
        )
    }
    acc = report["accuracy"]
    # The same float as the run's --json summary, on the page, on both figures and in report.json.
    assert acc["energy_mae_eV_per_atom"] == summary["energy_mae_eV_per_atom"]
    assert acc["forces_mae_eV_per_A"] == summary["forces_mae_eV_per_A"]
    for figure in ("energy_parity", "energy_error"):
        assert _number(report, figure, "MAE") == summary["energy_mae_eV_per_atom"]
    for figure in ("force_parity", "force_error"):
        assert _number(report, figure, "MAE") == summary["forces_mae_eV_per_A"]
    assert number(summary["energy_mae_eV_per_atom"], "eV/atom") in page
    assert number(summary["forces_mae_eV_per_A"], "eV/Å") in page
    assert acc["force_parity"] == "points" and acc["structures"] == 100
    assert acc["energy_rmse_eV_per_atom"] >= acc["energy_mae_eV_per_atom"]
    # Per element: each bar is report.json's value, and the elements add up to the overall MAE.
    per = report["per_element"]
    for p in per:
        assert _number(report, "force_mae_per_element", p["element"]) == p["forces_mae_eV_per_A"]
    total = sum(p["forces_mae_eV_per_A"] * 3 * p["atoms"] for p in per) / acc["force_components"]
    assert total == pytest.approx(acc["forces_mae_eV_per_A"], rel=1e-12)
    assert sum(p["atoms"] for p in per) * 3 == acc["force_components"]
    # Statuses: counts, meanings, and the command that lists them.
    assert report["statuses"] == [
        {
            "status": "ok",
            "code": 1,
            "count": 100,
            "meaning": STATUS_MEANING["ok"],
            "list": report["statuses"][0]["list"],
        }
    ]
    listed = CliRunner().invoke(batch_main, shlex.split(report["statuses"][0]["list"])[1:])
    assert listed.exit_code == 0, listed.output
    with h5py.File(EXAMPLES) as fh:
        ids = [s.decode() for s in fh["ids"][...]]
    assert [line.split("\t")[1] for line in listed.output.splitlines()] == ids
    assert report["fingerprint"]["runtime"] == summary["runtime"] and not report["partial"]


def test_worst_structures_and_their_export_command(demo, tmp_path):
    import ase.io

    out, _ = demo
    report, page = _load(write_report(out, EXAMPLES, tmp_path / "report"))
    with h5py.File(EXAMPLES) as fh, h5py.File(out) as res:
        offsets = fh["atom_offset"][...]
        natoms = np.diff(offsets)
        e_err = np.abs(res["energy"][...] - fh["energy"][...]) / natoms
        f_err = np.linalg.norm(res["forces"][...] - fh["forces"][...], axis=1)
        f_max = np.maximum.reduceat(f_err, offsets[:-1])
        ids = [s.decode() for s in fh["ids"][...]]
    for key, errors in (("energy", e_err), ("forces", f_max)):
        worst = report["worst"][key]
        expected = np.argsort(-errors, kind="stable")[:20]
        assert [r["index"] for r in worst["structures"]] == expected.tolist()
        assert [r["error"] for r in worst["structures"]] == pytest.approx(errors[expected], rel=1e-12)
        assert worst["export"] in page.replace("&#x27;", "'")
        argv = shlex.split(worst["export"])
        assert argv[:2] == ["painn-batch", "export"]
        target = tmp_path / f"worst_{key}.extxyz"
        argv[argv.index("-o") + 1] = str(target)
        result = CliRunner().invoke(batch_main, argv[1:])
        assert result.exit_code == 0, result.output
        frames = ase.io.read(target, index=":")
        assert [a.info["id"] for a in frames] == sorted((ids[s] for s in expected), key=ids.index)


def test_export_index_refuses_what_is_not_there(demo, tmp_path):
    out, _ = demo
    for bad, code in (("1,x", 2), ("0,100", 1)):
        args = [
            "export",
            str(out),
            "--input",
            str(EXAMPLES),
            "-o",
            str(tmp_path / "x.extxyz"),
            "--index",
            bad,
        ]
        result = CliRunner().invoke(batch_main, args)
        assert result.exit_code == code, result.output
        assert "--index" in result.output and not (tmp_path / "x.extxyz").exists()


def test_streamed_in_small_chunks_and_binned_gives_the_same_numbers(demo, tmp_path, monkeypatch):
    """Chunks of 50 atoms and 7 structures, scatter plots binned: the numbers of one big read."""
    import pipelines.report_data as data

    out, _ = demo
    whole, _ = _load(write_report(out, EXAMPLES, tmp_path / "whole"))
    monkeypatch.setattr(data, "CHUNK_ATOMS", 50)
    monkeypatch.setattr(data, "CHUNK_STRUCTURES", 7)
    index = write_report(out, EXAMPLES, tmp_path / "small", max_points=50)
    small = check_figures(index)
    assert small["accuracy"]["force_parity"] == "binned"
    assert small["accuracy"]["energy_mae_eV_per_atom"] == whole["accuracy"]["energy_mae_eV_per_atom"]
    for key in ("forces_rmse_eV_per_A", "energy_rmse_eV_per_atom"):
        assert small["accuracy"][key] == pytest.approx(whole["accuracy"][key], rel=1e-12)
    assert [p["atoms"] for p in small["per_element"]] == [p["atoms"] for p in whole["per_element"]]
    assert [p["forces_mae_eV_per_A"] for p in small["per_element"]] == pytest.approx(
        [p["forces_mae_eV_per_A"] for p in whole["per_element"]], rel=1e-12
    )
    assert small["worst"] == whole["worst"]
    assert small["distributions"] == whole["distributions"]


def test_binned_force_cloud_is_a_histogram_of_every_component(demo):
    """The second pass's 2-D histogram against numpy's, on the points the first pass keeps."""
    import pipelines.report_data as data
    from painn_export.schema import InputReader

    out_path, _ = demo
    out = data.open_output(out_path)
    try:
        with InputReader(EXAMPLES) as reader:
            kept = data.scan_run(out, reader, max_points=10**9)
            binned = data.scan_run(out, reader, max_points=10)
            cloud, err_counts, err_edges = data.force_clouds(out, reader, binned)
    finally:
        out.close()
    p = kept.force_points
    assert isinstance(cloud, data.Binned) and binned.force_points is None
    assert len(p.x) == kept.force_components
    assert cloud.counts.sum() == kept.force_components == err_counts.sum()
    edges = cloud.x_edges
    expected, _, _ = np.histogram2d(p.x, p.y, [edges, edges])
    # A value on an inner edge may fall either side of it in floating point: a few at most.
    assert np.abs(cloud.counts - expected).sum() <= 2 * 0.001 * kept.force_components
    assert (
        np.abs(np.histogram(p.y - p.x, err_edges)[0] - err_counts).sum() <= 2 * 0.001 * kept.force_components
    )


def test_partial_output_reports_what_is_done(demo, tmp_path):
    """Stopped halfway: the second half pending (status 0) with NaN data, as the writer leaves it."""
    out, _ = demo
    partial = tmp_path / "out.partial.h5"
    shutil.copy(out, partial)
    with h5py.File(partial, "r+") as fh, h5py.File(EXAMPLES) as inp:
        a = int(inp["atom_offset"][50])
        fh["status"][50:] = 0
        fh["energy"][50:] = np.nan
        fh["forces"][a:] = np.nan
    report = check_figures(write_report(partial, EXAMPLES))
    page = (tmp_path / "out.partial.report" / "index.html").read_text()
    assert report["partial"] and report["done"] == 50
    assert "Partial output: 50 of 100 structures are done" in page
    assert {s["status"]: s["count"] for s in report["statuses"]} == {"pending": 50, "ok": 50}
    assert report["accuracy"]["structures"] == 50
    assert report["accuracy"]["force_components"] == 3 * int(
        np.asarray(h5py.File(EXAMPLES)["atom_offset"])[50]
    )
    # The finished name, while only the partial file exists: pointed to it.
    with pytest.raises(ReportError, match=r"out\.partial\.h5 holds what is done"):
        write_report(tmp_path / "out.h5", EXAMPLES)


def test_bad_inputs_are_one_line_and_exit_1(demo, tmp_path):
    out, _ = demo
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        ([str(EXAMPLES)], r"not a painn-batch output \(no status"),  # an input file, not an output
        ([str(text)], r"not a painn-batch output \(not a readable HDF5 file\)"),
        ([str(out), "--input", str(RELAX_EXAMPLES)], "was not computed from .*emt_relax_examples.h5"),
        ([str(out), "-o", str(a_file / "report")], "cannot write the report folder .*Not a directory"),
        ([str(out), "-o", str(a_file)], "cannot write the report folder .*it is a file"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(batch_main, ["report", *args])
        assert result.exit_code == 1, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(message, result.output), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "notes.h5"]  # nothing left behind
    with pytest.raises(ReportError, match="not a painn-batch output"):
        write_report(EXAMPLES)


def test_report_folder_replaces_a_report_and_refuses_anything_else(demo, tmp_path):
    out, _ = demo
    target = tmp_path / "r"
    write_report(out, None, target)
    (target / "stale.png").write_bytes(b"x")
    write_report(out, None, target)  # an earlier report: replaced whole
    assert not (target / "stale.png").exists() and (target / "index.html").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(ReportError, match="holds something other than a report"):
        write_report(out, None, other)
    assert (other / "thesis.tex").read_text() == "keep me"
    with pytest.raises(RuntimeError), report_folder(tmp_path / "failing"):
        raise RuntimeError("a figure failed")
    assert not (tmp_path / "failing").exists() and not list(tmp_path.glob("failing*"))


def test_run_report_without_input_says_what_it_lacks(demo, tmp_path):
    out, _ = demo
    report = check_figures(write_report(out, folder=tmp_path / "r"))
    page = (tmp_path / "r" / "index.html").read_text()
    assert [f["file"] for f in report["figures"]] == ["energy.png"]
    assert "No --input given" in page and "accuracy" not in report
    assert _number(report, "energy", "structures") == 100


def test_relax_report_on_the_demo(relaxed, tmp_path):
    out, summary = relaxed
    report = check_figures(write_report(out, RELAX_EXAMPLES, tmp_path / "r"))
    names = {f["file"].removesuffix(".png") for f in report["figures"]}
    assert names == {
        "steps",
        "final_largest_force",
        "relaxed_energy_parity",
        "trajectory_energy",
        "trajectory_fmax",
        "trajectory_energy_spread",
        "trajectory_fmax_spread",
    }
    assert report["kind"] == "relax"
    assert report["relaxed_reference"] == summary.reference
    assert (
        _number(report, "relaxed_energy_parity", "MAE") == summary.reference["relaxed_energy_mae_eV_per_atom"]
    )
    with h5py.File(out) as fh:
        steps = fh["steps"][...]
    assert report["steps"]["max"] == steps.max() == _number(report, "steps", "most")
    # Every structure converged: the final largest force on a free atom is below --fmax.
    assert report["distributions"]["final_largest_force"]["max"] < 0.05
    assert report["distributions"]["final_largest_force"]["structures"] == 24
    traj = report["trajectory"]
    assert traj["every"] == 5 and traj["running"][0] == 24 and len(traj["sample"]) == 10
    assert len(traj["steps"]) == steps.max() // 5 + 1
    # The spread's first frame: no energy change yet; the largest forces of the start geometries.
    assert traj["energy_change"]["median"][0] == pytest.approx(0, abs=1e-3)
    with h5py.File(out) as fh:
        start = fh["trajectory_fmax"][:, 0]
    assert traj["fmax"]["median"][0] == pytest.approx(np.median(start), rel=0.05)


def test_relax_report_without_input(relaxed, tmp_path):
    out, _ = relaxed
    report = check_figures(write_report(out, folder=tmp_path / "r"))
    names = {f["file"].removesuffix(".png") for f in report["figures"]}
    assert names == {
        "steps",
        "trajectory_energy",
        "trajectory_fmax",
        "trajectory_energy_spread",
        "trajectory_fmax_spread",
    }
    assert report["trajectory"]["energy_change"]["unit"] == "eV"
    assert "No --input given" in (tmp_path / "r" / "index.html").read_text()


def test_a_partial_file_being_written_can_be_reported(demo, tmp_path):
    """Another process holds the partial file open for writing (HDF5's lock): the report still reads it."""
    out, _ = demo
    partial = tmp_path / "busy.partial.h5"
    shutil.copy(out, partial)
    code = (
        "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(120)"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(partial)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        report = check_figures(write_report(partial, EXAMPLES, tmp_path / "r"))
    finally:
        writer.kill()
        writer.wait()
    assert report["done"] == 100 and report["partial"]  # named .partial.h5: a run not renamed yet


def test_make_demo_ends_with_the_report(demo, tmp_path):
    """The Makefile's demo recipe: its last line reports on the run's output, from a bare copy."""
    out, _ = demo
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    run, report = (shlex.split(line.strip().replace("$(VENV)/bin/", "")) for line in recipe[-2:])
    assert run[:2] == ["painn-batch", "run"] and report[:2] == ["painn-batch", "report"]
    copy = tmp_path / "p"
    shutil.copytree(ROOT / "examples", copy / "examples")
    target = copy / run[run.index("--output") + 1]
    target.parent.mkdir(parents=True)
    shutil.copy(out, target)  # what the recipe's run line writes (the demo fixture ran it)
    assert report[2] == run[run.index("--output") + 1] and report[report.index("--input") + 1] == run[2]
    bindir = Path(sys.executable).parent
    proc = subprocess.run([str(bindir / report[0]), *report[1:]], cwd=copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = copy / "out" / "emt_examples.out.report" / "index.html"
    assert proc.stderr.strip() == f"wrote {index.relative_to(copy)}"
    check_figures(index)


def test_parity_report_shows_each_runtime_against_float64(tmp_path):
    from painn_export.parity import run_parity
    from painn_export.parity_report import write_parity_report
    from painn_export.runners import TorchRunner
    from painn_export.samples import example_set

    from conftest import make_model

    model = make_model()
    samples = example_set(num_elements=model.config.num_elements)
    runners = [
        (TorchRunner(model, dtype="float32"), "float32"),
        (TorchRunner(model, dtype="float64"), "float64"),
    ]
    rows = run_parity(model, runners, samples)
    for r in rows:  # the per-structure differences and the comparison agree (one NaN rule)
        assert len(r.per_structure) == len(samples)
        assert r.per_structure.max() == r.comparison.max_abs, r.comparison.quantity
    report = check_figures(write_parity_report(rows, [s.name for s in samples], tmp_path / "parity"))
    assert {f["file"] for f in report["figures"]} == {"parity_energy_per_atom.png", "parity_forces.png"}
    forces = next(r for r in rows if r.comparison.quantity == "forces")
    assert _number(report, "parity_forces", "torch-cpu-float32 float32 max") == forces.comparison.max_abs
    worst = next(w for w in report["worst"] if w["quantity"] == "forces")
    assert worst["structures"][0]["max_abs"] == forces.comparison.max_abs
    assert worst["structures"][0]["structure"] == samples[int(np.argmax(forces.per_structure))].name
    # PyTorch float64 is the reference itself: every structure counted as exactly equal.
    assert _number(report, "parity_forces", "torch-cpu-float64 float64 exactly equal (structures)") == len(
        samples
    )


def test_parity_report_from_the_command_line(tmp_path, monkeypatch):
    from painn_export.cli import main as export_main

    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(
        export_main, ["parity", "--report", str(tmp_path / "p"), "--input", str(EXAMPLES), "--limit", "8"]
    )
    assert result.exit_code == 0, result.output
    check_figures(tmp_path / "p" / "index.html")


def _chromium_without_network() -> bool:
    if shutil.which("chromium") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _chromium_without_network(), reason="needs chromium and unshare -n (docs/report.md)")
def test_page_shows_every_image_in_chromium_without_network(demo, tmp_path):
    out, _ = demo
    index = write_report(out, EXAMPLES, tmp_path / "report")
    script = [sys.executable, str(ROOT / "scripts" / "check_report_page.py")]
    ok = subprocess.run([*script, str(index.parent)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 7 and all(
        " loaded 640x480" in line for line in ok.stdout.splitlines()
    )
    (index.parent / "force_parity.png").unlink()  # the check sees a missing image
    bad = subprocess.run([*script, str(index.parent)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "not shown: force_parity.png MISSING" in bad.stderr
