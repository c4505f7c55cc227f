"""ONNX export: parity with PyTorch across shapes, determinism, the TensorRT operator check, metadata, CLI."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from painn_export.batch import collate
from painn_export.cli import main
from painn_export.errors import RuntimeUnavailableError
from painn_export.export import export_onnx, graphs_for
from painn_export.metadata import read_metadata
from painn_export.opcheck import check_model, load_facts, parse_operator_table
from painn_export.parity import nondeterministic, run_parity
from painn_export.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from painn_export.samples import bulk, example_set, single_atom
from painn_export.tolerances import compare, tolerance

from conftest import GRADIENT, SMALL, make_model
from structures import chain

SCATTERS = {"ScatterND", "ScatterElements", "Scatter"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = make_model(SMALL, torch.float32)
    out = {}
    for dtype in (torch.float32, torch.float64):
        path = tmp_path_factory.mktemp("onnx") / f"small_{dtype}.onnx"
        out[dtype] = (model, export_onnx(model, path, dtype=dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_onnxruntime_matches_torch_on_every_kind(exported, dtype):
    model, path = exported[dtype]
    precision = str(dtype).removeprefix("torch.")
    rows = run_parity(model, [(OnnxRuntimeRunner(path, threads=2), precision)], example_set(num_elements=83))
    failures = [r.as_dict() for r in rows if not r.comparison.passed]
    assert not failures, failures
    assert any(r.comparison.quantity == "repeat:forces" for r in rows)


@pytest.mark.parametrize(
    "shape", ["one_atom_no_edges", "one_system", "many_systems", "isolated_atom", "large_batch"]
)
def test_dynamic_shapes_at_the_edges(exported, shape):
    model, path = exported[torch.float32]
    rng = np.random.default_rng(3)
    samples = example_set(seed=3, sizes=(4, 7))
    pick = {
        "one_atom_no_edges": [single_atom(rng, np.arange(1, 84))],
        "one_system": samples[:1],
        "many_systems": samples,
        "isolated_atom": [s for s in samples if s.name == "isolated_atom"],
        "large_batch": example_set(seed=4, sizes=(40, 60, 80)),
    }[shape]
    feed = collate(graphs_for(model, pick), np.float32)
    with OnnxRuntimeRunner(path) as ort_runner, TorchRunner(model, dtype="float64") as torch_runner:
        got, want = ort_runner.infer(feed), torch_runner.infer(feed)
    assert got["energy"].shape == (len(pick),) and got["forces"].shape == (feed["positions"].shape[0], 3)
    assert_agree(got, want, feed, "onnxruntime_vs_torch", "float32")


def assert_agree(got, want, feed, comparison: str, precision: str) -> None:
    """Energies per atom, forces (and stress) within the tolerance table's bounds."""
    natoms = feed["natoms"]
    pairs = {
        "energy": (got["energy"] / natoms, want["energy"] / natoms),
        "forces": (got["forces"], want["forces"]),
    }
    if "stress" in got:
        pairs["stress"] = (got["stress"], want["stress"])
    for name, (a, b) in pairs.items():
        result = compare(name, a, b, tolerance(comparison, precision, name))
        assert result.passed, result.describe()


def test_graph_has_no_scatter_and_passes_the_tensorrt_operator_check(exported):
    _, path = exported[torch.float32]
    report = check_model(path)
    assert report.ok, report.violations
    assert not SCATTERS & set(report.operators), report.operators
    assert report.operators.get("ReduceSum", 0) >= 2 * SMALL.num_layers  # the slot sums


def test_operator_check_flags_a_planted_scatternd_with_reduction(exported):
    _, path = exported[torch.float32]
    proto = onnx.load(str(path))
    data = proto.graph.output[0].name
    idx = onnx.helper.make_tensor("planted_idx", onnx.TensorProto.INT64, [1, 1], [0])
    upd = onnx.helper.make_tensor("planted_upd", onnx.TensorProto.FLOAT, [1], [1.0])
    proto.graph.initializer.extend([idx, upd])
    proto.graph.node.append(
        onnx.helper.make_node(
            "ScatterND", [data, "planted_idx", "planted_upd"], ["planted_out"], reduction="add"
        )
    )
    proto.graph.output.append(onnx.helper.make_tensor_value_info("planted_out", onnx.TensorProto.FLOAT, None))
    report = check_model(proto)
    assert any("ScatterND" in v and "reduction" in v for v in report.violations), report.violations
    # and an unsupported operator
    proto.graph.node.append(onnx.helper.make_node("Bernoulli", [data], ["planted_b"]))
    assert any("Bernoulli" in v for v in check_model(proto).violations)


def test_shape_inputs_are_not_data(exported):
    """ConstantOfShape's int64 shape input is not checked as data; its output's type is."""
    _, path = exported[torch.float32]
    proto = onnx.load(str(path))
    shape = onnx.helper.make_tensor("planted_shape", onnx.TensorProto.INT64, [1], [4])
    proto.graph.initializer.append(shape)
    for dtype, name in ((onnx.TensorProto.FLOAT, "planted_f32"), (onnx.TensorProto.DOUBLE, "planted_f64")):
        value = onnx.helper.make_tensor("v", dtype, [1], [0.0])
        proto.graph.node.append(
            onnx.helper.make_node("ConstantOfShape", ["planted_shape"], [name], value=value)
        )
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, [4]))
    violations = check_model(proto).violations
    assert not any("planted_shape" in v or "planted_f32" in v for v in violations), violations
    assert any("planted_f64" in v and "DOUBLE" in v for v in violations), violations


def test_bundled_operator_facts():
    """The facts the check uses ship with the package, with their source and release."""
    rules, (lo, hi), source = load_facts()
    assert (lo, hi) == (9, 20) and "onnx-tensorrt" in source and "10.1" in source
    assert rules["ScatterND"].supported and rules["ScatterND"].no_reduction
    assert not rules["Bernoulli"].supported
    assert rules["ReduceSum"].constant_inputs == ("axes",)
    assert rules["LayerNormalization"].first_output_only
    assert "INT64" in rules["Gather"].types and "DOUBLE" not in rules["Gather"].types


def test_operator_table_parser_reads_each_restriction(tmp_path):
    """The parser behind scripts/make_trt_operator_facts.py, on a table of the same form."""
    table = tmp_path / "operators.md"
    table.write_text(
        "TensorRT 10.9 supports operators in the inclusive range of opset 9 to opset 22.\n"
        "| Operator | Supported | Supported Types | Restrictions |\n"
        "|---|---|---|---|\n"
        "| Gather | Y | FP32, INT64 |\n"
        "| ScatterND | Y | FP32 | `reduction` is not supported |\n"
        "| ReduceSum | Y | FP32 | `axes` must be an initializer |\n"
        "| Resize | Y | FP32 | Antialiasing is not supported. |\n"
        "| Bernoulli | N |\n"
    )
    rules, opsets = parse_operator_table(table)
    assert opsets == (9, 22) and set(rules) == {"Gather", "ScatterND", "ReduceSum", "Resize", "Bernoulli"}
    assert rules["ScatterND"].no_reduction and not rules["ScatterND"].other_limits
    assert rules["ReduceSum"].constant_inputs == ("axes",) and not rules["ReduceSum"].other_limits
    assert rules["Resize"].other_limits and not rules["Bernoulli"].supported
    assert rules["Gather"].types == frozenset({"FP32", "INT64"})


def test_metadata(exported):
    path = exported[torch.float32][1]
    meta = read_metadata(path)
    assert json.loads(meta["painn_export.config"])["hidden_channels"] == SMALL.hidden_channels
    assert float(meta["painn_export.cutoff"]) == SMALL.cutoff
    assert meta["painn_export.max_neighbors"] == str(SMALL.max_neighbors)
    assert json.loads(meta["painn_export.units"])["forces"] == "eV/Angstrom"
    assert json.loads(meta["painn_export.elements"])[-1] == 83
    assert meta["painn_export.package_version"]
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["positions"] == ["n_atoms", 3] and dims["neighbors"] == ["n_atoms", "n_slots"]
    assert dims["neighbor_shift"] == ["n_atoms", "n_slots", 3] and dims["pair_slots"] == ["n_pairs", 2]
    assert meta["painn_export.contract_version"] == "3"
    assert json.loads(meta["painn_export.inputs"]) == [i.name for i in graph.input]


def test_runners_refuse_infer_before_activate(exported):
    path = exported[torch.float32][1]
    with pytest.raises(RuntimeError, match="activate"):
        OnnxRuntimeRunner(path).infer({})


def test_tensorrt_runner_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on a machine without it
    with pytest.raises(RuntimeUnavailableError, match="pip install"):
        TensorRTRunner(tmp_path / "x.engine").activate()


def test_cli_onnx_and_parity_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    from painn_export import save_model

    save_model(make_model(SMALL, torch.float32), tmp_path / "small.pt")
    result = runner.invoke(main, ["onnx", "--checkpoint", "small.pt", "-o", "small.onnx"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime-cpu" in result.output and "FAIL" not in result.output
    result = runner.invoke(main, ["parity", "--checkpoint", "small.pt", "--onnx", "small.onnx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and {r["runtime"] for r in report["rows"]} == {
        "torch-cpu-float32",
        "onnxruntime-cpu",
    }
    from painn_export.schema import write_input

    samples = example_set(seed=5, sizes=(6,))
    write_input(tmp_path / "s.h5", [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples])
    result = runner.invoke(
        main, ["parity", "--checkpoint", "small.pt", "--onnx", "small.onnx", "--input", "s.h5"]
    )
    assert result.exit_code == 0 and "structure" in result.output, result.output
    result = runner.invoke(main, ["check-ops", "small.onnx"])
    assert result.exit_code == 0 and "ok" in result.output and "10.1" in result.output


def test_cli_trt_without_tensorrt_is_one_clear_line(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on a machine without it
    _, path = exported[torch.float32]
    result = CliRunner().invoke(main, ["trt", str(path), "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 2, result.output
    assert "pip install" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.engine").exists()


def test_cli_refuses_two_models():
    result = CliRunner().invoke(main, ["onnx", "--checkpoint", "x.pt", "--random-init", "demo"])
    assert result.exit_code == 2 and "not both" in result.output


@pytest.fixture(scope="module")
def gradient_exports(tmp_path_factory):
    """A gradient-force checkpoint exported by the CLI (float32, with stress) and float64 by the API."""
    from painn_export import save_model

    model = make_model(GRADIENT, torch.float64)
    tmp = tmp_path_factory.mktemp("gradient")
    ckpt = save_model(model, tmp / "gradient.pt")
    f32 = tmp / "gradient_f32.onnx"
    result = CliRunner().invoke(main, ["onnx", "--checkpoint", str(ckpt), "-o", str(f32), "--stress"])
    assert result.exit_code == 0, result.output
    assert "gradient" in result.output and "stress" in result.output
    f64 = export_onnx(model, tmp / "gradient_f64.onnx", dtype=torch.float64, stress=True)
    return model, ckpt, {"float32": f32, "float64": f64}


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_gradient_graph_matches_torch_with_stress(gradient_exports, precision):
    model, _, paths = gradient_exports
    samples = [s for s in example_set(seed=5, num_elements=83) if s.name in ("bulk", "slab", "molecule")]
    rows = run_parity(model, [(OnnxRuntimeRunner(paths[precision]), precision)], samples)
    assert {r.comparison.quantity for r in rows} == {
        "energy_per_atom",
        "forces",
        "stress",
        "repeat:energy",
        "repeat:forces",
        "repeat:stress",
    }
    failures = [r.as_dict() for r in rows if not r.comparison.passed]
    assert not failures, failures
    meta = read_metadata(paths[precision])
    assert meta["painn_export.forces"] == "gradient"
    assert json.loads(meta["painn_export.outputs"]) == ["atom_energy", "forces", "atom_virial"]


@pytest.mark.parametrize("n_atoms, slots", [(1, 1), (2, 1), (3, 2), (5, 4)])
def test_gradient_graph_on_few_slots_matches_torch(gradient_exports, n_atoms, slots):
    """Batches of small molecules run on 1, 2 or 4 slots per atom: the exported graph agrees there."""
    model, _, paths = gradient_exports
    rng = np.random.default_rng(n_atoms)
    graphs = [chain(rng, n_atoms, model.config.cutoff) for _ in range(3)]
    want = model.predict(collate(graphs, np.float64), stress=True)
    feed = collate(graphs, np.float32)
    assert feed["neighbors"].shape[1] == slots
    with OnnxRuntimeRunner(paths["float32"]) as runner:
        got = runner.infer(feed)
    for key in ("energy", "forces", "stress"):
        assert compare(key, got[key], want[key], tolerance("onnxruntime_vs_torch", "float32", key)).passed


def test_gradient_graph_has_no_scatter_and_passes_the_tensorrt_operator_check(gradient_exports):
    """The backward of every gather is a gather through the reverse edges: no scatter either."""
    _, _, paths = gradient_exports
    report = check_model(paths["float32"])
    assert report.ok, report.violations
    assert not SCATTERS & set(report.operators), report.operators
    inputs = [i.name for i in onnx.load(str(paths["float32"])).graph.input]
    assert inputs[-1] == "neighbor_reverse" and "cell" not in inputs  # the volume is the host's


def test_gradient_checkpoint_exports_without_flags(gradient_exports, tmp_path):
    """No flag needed: the checkpoint's direct_forces=False selects the gradient graph."""
    _, ckpt, _ = gradient_exports
    out = tmp_path / "plain.onnx"
    result = CliRunner().invoke(main, ["onnx", "--checkpoint", str(ckpt), "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["painn_export.forces"] == "gradient"
    assert json.loads(meta["painn_export.outputs"]) == ["atom_energy", "forces"]


def test_stress_flag_is_refused_for_a_direct_force_model(tmp_path):
    from painn_export import save_model

    ckpt = save_model(make_model(SMALL, torch.float32), tmp_path / "direct.pt")
    result = CliRunner().invoke(
        main, ["onnx", "--checkpoint", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--stress"]
    )
    assert result.exit_code == 2 and "gradient-force model" in result.output


# --- Determinism: the same input twice, 2 threads, realistic size -------------------------------


@pytest.fixture(scope="module")
def big_feed():
    """One bulk cell of 2 000 atoms: about 40 000 edges at SMALL's cutoff and cap."""
    rng = np.random.default_rng(11)
    sample = bulk(rng, 2000, np.arange(1, 84))
    model = make_model(SMALL, torch.float32)
    graphs = graphs_for(model, [sample])
    assert graphs[0].n_edges > 30_000
    return collate(graphs, np.float32)


THREADS = (1, 2, 4, 8)  # 4 and 8 oversubscribe CI's 2 cores: fine for a determinism test


@pytest.mark.parametrize("kind", ["direct", "gradient_stress"])
def test_onnxruntime_is_bitwise_deterministic_at_any_tested_thread_count(
    kind, exported, gradient_exports, big_feed
):
    """At 1, 2, 4 and 8 threads: two runs in one session and one in a fresh session give
    identical bits, the same bits at every thread count, and they match PyTorch."""
    if kind == "direct":
        model, path = exported[torch.float32]
    else:
        model, _, paths = gradient_exports
        path = paths["float32"]
    answers = {}
    for threads in THREADS:
        with OnnxRuntimeRunner(path, threads=threads) as runner:
            first, second = runner.infer(big_feed), runner.infer(big_feed)
        with OnnxRuntimeRunner(path, threads=threads) as runner:
            third = runner.infer(big_feed)
        for name in first:
            assert np.array_equal(first[name], second[name], equal_nan=True), (threads, name)
            assert np.array_equal(first[name], third[name], equal_nan=True), (threads, name)
        answers[threads] = first
    for threads in THREADS[1:]:
        for name in answers[1]:
            assert np.array_equal(answers[1][name], answers[threads][name], equal_nan=True), (threads, name)
    with TorchRunner(model, dtype="float64", stress="stress" in answers[1]) as truth:
        want = truth.infer(big_feed)
    assert_agree(answers[1], want, big_feed, "onnxruntime_vs_torch", "float32")


class _RacyRunner(Runner):
    """Adds a different tiny error on each call: what a scatter with a data race does."""

    name = "racy"

    def __init__(self, inner: Runner) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def _activate(self) -> None:
        self.inner.activate()
        self.readout = self.inner.readout

    def _infer(self, feed):
        self.calls += 1
        out = self.inner._infer(feed)
        return {k: v + np.float32(1e-7 * self.calls) for k, v in out.items()}


def test_parity_reports_a_nondeterministic_runtime(exported):
    """An error small enough to pass against truth is still caught: two answers to one input."""
    model, path = exported[torch.float32]
    rows = run_parity(model, [(_RacyRunner(OnnxRuntimeRunner(path)), "float32")], example_set(seed=1))
    truth_rows = [r for r in rows if not r.comparison.quantity.startswith("repeat:")]
    assert all(r.comparison.passed for r in truth_rows)
    assert {r.comparison.quantity for r in nondeterministic(rows)} == {"repeat:energy", "repeat:forces"}


# --- float16 / bfloat16 exports: the network narrow, inputs, geometry and outputs float32 -------


@pytest.fixture(scope="module")
def reduced_exports(tmp_path_factory):
    """float16 direct (by the CLI, which runs its ONNX Runtime check), float16 gradient with stress
    and bfloat16 direct (by the API)."""
    from painn_export import save_model

    tmp = tmp_path_factory.mktemp("reduced")
    direct, gradient = make_model(SMALL, torch.float32), make_model(GRADIENT, torch.float32)
    ckpt = save_model(direct, tmp / "direct.pt")
    f16 = tmp / "direct_f16.onnx"
    result = CliRunner().invoke(
        main, ["onnx", "--checkpoint", str(ckpt), "-o", str(f16), "--dtype", "float16"]
    )
    paths = {
        "float16": f16,
        "float16_stress": export_onnx(gradient, tmp / "gradient_f16.onnx", dtype=torch.float16, stress=True),
        "bfloat16": export_onnx(direct, tmp / "direct_bf16.onnx", dtype=torch.bfloat16),
    }
    return {"direct": direct, "gradient": gradient, "ckpt": ckpt, "cli": result, **paths}


def test_cli_onnx_float16_runs_its_check_in_float16_tolerances(reduced_exports):
    result = reduced_exports["cli"]
    assert result.exit_code == 0, result.output
    assert "float16" in result.output and "FAIL" not in result.output
    assert "onnxruntime-cpu" in result.output


@pytest.mark.parametrize("key", ["float16", "float16_stress", "bfloat16"])
def test_reduced_precision_graphs_take_and_give_float32_and_pass_the_tensorrt_check(reduced_exports, key):
    """float32 inputs and outputs around a float16/bfloat16 network; the precision is in the metadata;
    TensorRT's ONNX-parser facts accept every node and type."""
    path = reduced_exports[key]
    graph = onnx.load(str(path)).graph
    narrow = onnx.TensorProto.FLOAT16 if key.startswith("float16") else onnx.TensorProto.BFLOAT16
    assert {i.type.tensor_type.elem_type for i in graph.input} == {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }
    assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
    weights = [t for t in graph.initializer if t.data_type in (narrow, onnx.TensorProto.FLOAT)]
    assert sum(t.data_type == narrow for t in weights) > sum(
        t.data_type == onnx.TensorProto.FLOAT for t in weights
    )
    meta = read_metadata(path)
    assert meta["painn_export.dtype"] == ("float16" if key.startswith("float16") else "bfloat16")
    assert meta["painn_export.input_dtype"] == "float32"
    report = check_model(path)
    assert report.ok, report.violations
    assert not SCATTERS & set(report.operators)


@pytest.mark.parametrize("key", ["float16", "float16_stress"])
def test_float16_graph_matches_float64_torch_on_onnxruntime(reduced_exports, key):
    """Energies, forces (and stress) within the float16 entry of the tolerance table, twice bitwise."""
    model = reduced_exports["gradient" if key.endswith("stress") else "direct"]
    runner = OnnxRuntimeRunner(reduced_exports[key], threads=2)
    rows = run_parity(model, [(runner, "float16")], example_set(num_elements=83, large=256))
    failures = [r.as_dict() for r in rows if not r.comparison.passed]
    assert not failures, failures
    quantities = {r.comparison.quantity for r in rows}
    assert ("stress" in quantities) == key.endswith("stress")


def test_onnxruntime_cpu_runs_some_float16_nodes_in_float32(reduced_exports, tmp_path):
    """What docs/gpu.md says of the float16 check on ONNX Runtime's CPU provider: it inserts casts
    around the nodes it has no float16 kernel for, so it is not TensorRT's all-float16 arithmetic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(reduced_exports["float16"]), options, providers=["CPUExecutionProvider"])
    names = [n.name for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert sum(name.startswith("InsertedPrecisionFreeCast") for name in names) > 0


def test_bfloat16_graph_is_refused_by_onnxruntime_cpu_in_one_line(reduced_exports, tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 Gemm: the CLI writes the file, then says so (exit 2)."""
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"), OnnxRuntimeRunner(reduced_exports["bfloat16"]):
        pass
    out = tmp_path / "bf16.onnx"
    result = CliRunner().invoke(
        main, ["onnx", "--checkpoint", str(reduced_exports["ckpt"]), "-o", str(out), "--dtype", "bfloat16"]
    )
    assert result.exit_code == 2, result.output
    assert "cannot run a bfloat16 graph" in result.output and "--skip-check" in result.output
    assert "Traceback" not in result.output and out.is_file()
