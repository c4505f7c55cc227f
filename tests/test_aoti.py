"""AOTInductor packages: parity with float64 PyTorch, bitwise repeats, clean refusals, the pipeline.

Each package is compiled once per test run (a session fixture that is the
runtime's own cache, so ``--runtime aoti`` on the checkpoint reuses it).
"""

import json
import zipfile

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from painn_export import save_model
from painn_export.aoti import PACKAGE_FACTS, PackageMismatchError, export_aoti, read_package_facts
from painn_export.batch import collate
from painn_export.cli import main as export_main
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import graphs_for
from painn_export.parity import nondeterministic, run_parity
from painn_export.runners import AOTInductorRunner, open_runner
from painn_export.samples import example_set, single_atom
from painn_export.schema import write_input
from pipelines.cli import main as batch_main

from checks import assert_close
from conftest import GRADIENT, SMALL, make_model
from structures import chain


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """A direct-force package through the runtime's cache, and a gradient one with stress."""
    import os

    from painn_export.demo import cached_aoti

    tmp = tmp_path_factory.mktemp("aoti")
    cache = tmp / "cache"
    direct = make_model(SMALL, torch.float32)
    ckpt = save_model(direct, tmp / "direct.pt")
    old = os.environ.get("PAINN_EXPORT_CACHE")
    os.environ["PAINN_EXPORT_CACHE"] = str(cache)
    try:
        from painn_export.checkpoint import load_model

        direct_pt2 = cached_aoti(load_model(ckpt), ckpt)
    finally:
        if old is None:
            os.environ.pop("PAINN_EXPORT_CACHE")
        else:
            os.environ["PAINN_EXPORT_CACHE"] = old
    gradient = make_model(GRADIENT, torch.float64)
    gradient_pt2 = export_aoti(gradient, tmp / "gradient.pt2", stress=True)
    return {
        "direct": (direct, direct_pt2),
        "gradient": (gradient, gradient_pt2),
        "ckpt": ckpt,
        "cache": cache,
    }


@pytest.mark.parametrize("kind", ["direct", "gradient"])
def test_package_matches_float64_torch_at_the_edges_of_its_ranges(packages, kind):
    """Every kind of structure, one atom without edges, and many systems at once; twice each."""
    model, path = packages[kind]
    rng = np.random.default_rng(4)
    samples = [*example_set(seed=4, num_elements=83), single_atom(rng, np.arange(1, 84))]
    samples += example_set(seed=5, sizes=(3, 4, 5, 6))  # many small systems
    rows = run_parity(model, [(AOTInductorRunner(path, threads=2), "float32")], samples)
    failures = [r.as_dict() for r in rows if not r.comparison.passed]
    assert not failures, failures
    quantities = {r.comparison.quantity for r in rows}
    assert "repeat:forces" in quantities and not nondeterministic(rows)
    assert ("stress" in quantities) == (kind == "gradient")


@pytest.mark.parametrize("n_atoms, slots", [(1, 1), (2, 1), (3, 2), (5, 4)])
def test_package_on_few_slots_matches_torch(packages, n_atoms, slots):
    """Batches of small molecules run on 1, 2 or 4 slots per atom, within the package's Dim range."""
    model, path = packages["gradient"]
    rng = np.random.default_rng(n_atoms)
    graphs = [chain(rng, n_atoms, model.config.cutoff) for _ in range(3)]
    want = model.predict(collate(graphs, np.float64), stress=True)
    feed = collate(graphs, np.float32)
    assert feed["neighbors"].shape[1] == slots
    with AOTInductorRunner(path, threads=2) as runner:
        got = runner.infer(feed)
    for key in ("energy", "forces", "stress"):
        assert_close(key, got[key], want[key], "aoti_vs_torch", "float32")


def test_describe_equals_the_started_package_runner(packages, monkeypatch):
    """What a Ray driver records for a .pt2, and for --runtime aoti on a checkpoint, is what runs."""
    from painn_export.runners import describe

    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(packages["cache"]))
    for path, runtime in ((packages["gradient"][1], "aoti"), (packages["ckpt"], "aoti")):
        identity, facts = describe(path, runtime, "cpu")
        runner, opened = open_runner(path, runtime, "cpu")
        with runner:
            assert identity == runner.identity() and facts == opened
    with pytest.raises(PackageMismatchError, match="compiled for device cpu, not cuda"):
        describe(packages["gradient"][1], "aoti", "cuda")


def test_package_is_bitwise_repeatable_with_two_threads(packages):
    model, path = packages["gradient"]
    samples = example_set(seed=6, sizes=(40, 60), large=300)
    feed = collate(graphs_for(model, samples), np.float32)
    with AOTInductorRunner(path, threads=2) as runner:
        first, second = runner.infer(feed), runner.infer(feed)
    with AOTInductorRunner(path, threads=2) as runner:
        third = runner.infer(feed)
    for name in first:
        assert np.array_equal(first[name], second[name], equal_nan=True), name
        assert np.array_equal(first[name], third[name], equal_nan=True), name


def test_package_carries_its_facts_and_no_scatter(packages):
    _, path = packages["gradient"]
    facts = read_package_facts(path)
    assert facts["torch_version"] == torch.__version__ and facts["device"] == "cpu"
    assert json.loads(facts["metadata"]["painn_export.outputs"]) == ["atom_energy", "forces", "atom_virial"]
    with zipfile.ZipFile(path) as archive:
        code = "".join(
            archive.read(n).decode(errors="replace") for n in archive.namelist() if n.endswith((".cpp", ".h"))
        )
    assert code, "the package holds no generated C++ to check"
    # the backward of a gather is a gather through the reverse slots: no scatter, no atomics
    for banned in ("atomic_add", "index_put", "scatter"):
        assert banned not in code, banned


def _rewritten(path, tmp_path, **changes):
    out = tmp_path / "changed.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == PACKAGE_FACTS:
                data = json.dumps({**json.loads(data), **changes}).encode()
            dst.writestr(item, data)
    return out


@pytest.mark.parametrize(
    "changes, words",
    [({"torch_version": "2.11.0"}, "torch_version 2.11.0"), ({"device": "cuda"}, "device cuda")],
)
def test_a_package_for_another_torch_or_device_is_refused(packages, tmp_path, changes, words):
    _, path = packages["direct"]
    other = _rewritten(path, tmp_path, **changes)
    with pytest.raises(PackageMismatchError, match=words):
        AOTInductorRunner(other, device="cpu").activate()
    inp = write_input(
        tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in example_set()[:2]]
    )
    result = CliRunner().invoke(
        batch_main, ["run", str(inp), "--model", str(other), "-o", str(tmp_path / "o.h5")]
    )
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, (
        result.output
    )


def test_a_file_that_is_not_a_package_is_one_line(tmp_path):
    bad = tmp_path / "x.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a painn-export AOTInductor package"):
        open_runner(bad)


def test_pipeline_on_the_package_agrees_with_onnxruntime(packages, tmp_path):
    """painn-batch run --model x.pt2 against the default ONNX path, within float32 tolerance."""
    _, path = packages["direct"]
    samples = example_set(seed=9, sizes=(7, 30, 90))
    inp = write_input(tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples])
    ckpt = packages["ckpt"]
    runs = {}
    for name, args in {"aoti": ["--model", str(path)], "onnx": ["--model", str(ckpt)]}.items():
        out = tmp_path / f"{name}.h5"
        result = CliRunner().invoke(
            batch_main, ["run", str(inp), *args, "-o", str(out), "--workers", "0", "--json"]
        )
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.output.strip().splitlines()[-1])
        with h5py.File(out) as fh:
            runs[name]["arrays"] = {k: fh[k][...] for k in ("energy", "forces")}
    assert runs["aoti"]["runtime"] == "aoti-cpu" and runs["onnx"]["runtime"] == "onnxruntime-cpu"
    natoms = np.array([len(s.atomic_numbers) for s in samples])
    a, b = runs["aoti"]["arrays"], runs["onnx"]["arrays"]
    assert_close("energy", a["energy"] / natoms, b["energy"] / natoms, "onnxruntime_vs_torch", "float32")
    assert_close("forces", a["forces"], b["forces"], "onnxruntime_vs_torch", "float32")


def test_runtime_aoti_on_a_checkpoint_reuses_the_cache(packages, tmp_path, monkeypatch):
    """--runtime aoti compiles once: the session fixture's package is what the run uses."""
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(packages["cache"]))
    cached = packages["direct"][1]
    before = cached.stat().st_mtime_ns
    runner, _ = open_runner(packages["ckpt"], "aoti", device="auto")
    assert runner.path == cached and cached.stat().st_mtime_ns == before


def test_without_a_compiler_it_says_so_in_one_line(tmp_path, monkeypatch):
    import painn_export.aoti as aoti

    monkeypatch.setattr(aoti.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeUnavailableError, match="C\\+\\+ compiler"):
        export_aoti(make_model(SMALL, torch.float32), tmp_path / "x.pt2")
    ckpt = save_model(make_model(SMALL, torch.float32), tmp_path / "m.pt")
    result = CliRunner().invoke(
        export_main, ["aoti", "--checkpoint", str(ckpt), "-o", str(tmp_path / "x.pt2")]
    )
    assert result.exit_code == 2 and "C++ compiler" in result.output, result.output
    assert not (tmp_path / "x.pt2").exists()


def test_cli_paths_to_a_package(packages, tmp_path, monkeypatch):
    """parity --pt2, run --runtime aoti on the checkpoint (cached package), and painn-export aoti itself."""
    _, path = packages["direct"]
    ckpt = packages["ckpt"]
    result = CliRunner().invoke(
        export_main, ["parity", "--checkpoint", str(ckpt), "--pt2", str(path), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and "aoti-cpu" in {r["runtime"] for r in report["rows"]}
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(packages["cache"]))
    inp = write_input(
        tmp_path / "in.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in example_set()[:3]]
    )
    args = [
        "run",
        str(inp),
        "--model",
        str(ckpt),
        "--runtime",
        "aoti",
        "-o",
        str(tmp_path / "o.h5"),
        "--json",
    ]
    result = CliRunner().invoke(batch_main, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["runtime"] == "aoti-cpu"
    gradient = save_model(make_model(GRADIENT, torch.float32), tmp_path / "g.pt")
    out = tmp_path / "g.pt2"
    result = CliRunner().invoke(
        export_main, ["aoti", "--checkpoint", str(gradient), "-o", str(out), "--stress"]
    )
    assert result.exit_code == 0 and "checked against eager" in result.output, result.output
    assert json.loads(read_package_facts(out)["metadata"]["painn_export.outputs"])[-1] == "atom_virial"
