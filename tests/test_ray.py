"""painn-batch run --ray: the same output as the local pipeline, through Ray Data on this machine.

Ray is a dev dependency, so these run in CI (2 CPUs). Each test starts and
stops its own Ray.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_pipeline import CLI, _done, _many, _read, _structures

from painn_export import save_model
from painn_export.schema import write_input
from pipelines.cli import main
from pipelines.ray_cluster import RayOptions
from pipelines.run import run_file

from checks import assert_close
from conftest import SMALL, make_model

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'painn-export[ray]')")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model(make_model(SMALL, torch.float32), tmp_path_factory.mktemp("m") / "m.pt")


@pytest.fixture
def fresh_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _statuses(path):
    with h5py.File(path) as fh:
        return fh["status"][...], fh["energy"][...], fh["forces"][...]


def test_ray_local_equals_the_local_pipeline(tmp_path, checkpoint, fresh_ray):
    """Same statuses (bad inputs included), same energies and forces, same fingerprints."""
    _, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", rows)
    local = run_file(inp, tmp_path / "local.h5", checkpoint, runtime="torch", workers=0, progress=False)
    import logging

    context = ray.data.DataContext.get_current()
    before = (logging.getLogger("ray.data").level, context.enable_progress_bars)
    on_ray = run_file(
        inp, tmp_path / "ray.h5", checkpoint, runtime="torch", progress=False, ray=RayOptions("local", cpus=2)
    )
    # Ray's process-wide state as it was; the Ray started for the run is stopped
    after = (logging.getLogger("ray.data").level, ray.data.DataContext.get_current().enable_progress_bars)
    assert after == before and not ray.is_initialized()
    assert on_ray.counts == local.counts and on_ray.counts["ok"] == len(rows) - len(expected_bad)
    s_local, e_local, f_local = _statuses(tmp_path / "local.h5")
    s_ray, e_ray, f_ray = _statuses(tmp_path / "ray.h5")
    np.testing.assert_array_equal(s_ray, s_local)
    assert_close("energy", e_ray, e_local, "other_batch", "float32")  # NaN on both sides passes
    assert_close("forces", f_ray, f_local, "other_batch", "float32")
    with h5py.File(tmp_path / "local.h5") as a, h5py.File(tmp_path / "ray.h5") as b:
        assert {k: v for k, v in a.attrs.items() if k.startswith("fingerprint")} == {
            k: v for k, v in b.attrs.items() if k.startswith("fingerprint")
        }


def test_a_worker_node_removed_mid_run_loses_nothing(tmp_path, checkpoint, fresh_ray):
    """Three nodes on this machine; one worker node is removed while a driver runs on them (the other
    joins mid-run)."""
    from ray.cluster_utils import Cluster

    inp = write_input(tmp_path / "in.h5", _many(3000, seed=3))
    run_file(inp, tmp_path / "local.h5", checkpoint, runtime="torch", workers=0, progress=False)
    # The head runs the driver only, so the work goes to the worker nodes. The doomed node is the
    # only one at first, so it certainly holds the actor and the graph tasks; the one that stays
    # joins mid-run, with two CPUs, so that the actor and the graph tasks fit once the other is gone.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out = tmp_path / "ray.h5"
    cmd = ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "-o", str(out), "-q"]
    ray_args = ["--ray", cluster.address, "--ray-actors", "1", "--ray-batch", "32"]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, *cmd, *ray_args], stderr=subprocess.PIPE, text=True
        )
        partial = tmp_path / "ray.partial.h5"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and _done(partial) < 100:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the node could be removed: {proc.stderr.read()}"
        held = _wait_until_busy(cluster.address, doomed.node_id, deadline, cpus=2)
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        cluster.remove_node(doomed)
        _, err = proc.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert held, "the removed node never held work of the run: the test would remove an idle node"
    if proc.returncode != 0:  # nothing lost silently: the pending work is named, and --resume completes it
        assert "did not come back" in err, err
        result = CliRunner().invoke(main, [*cmd, "--workers", "0", "--resume"])
        assert result.exit_code == 0, result.output
    _assert_same_results(out, tmp_path / "local.h5")


def _wait_until_busy(address: str, node_id: str, deadline: float, cpus: int = 1) -> bool:
    """Wait until the run holds some of the node's ``cpus`` CPUs (a graph task or the actor runs there);
    False if never."""
    import ray._private.state as state

    ray.init(address=address, log_to_driver=False)
    try:
        while time.time() < deadline:
            node = state.available_resources_per_node().get(node_id)
            if node is not None and node.get("CPU", 0.0) < cpus:  # a resource all in use is not listed
                return True
            time.sleep(0.02)
        return False
    finally:
        ray.shutdown()


def test_sigkill_of_the_driver_then_resume_equals_an_uninterrupted_run(tmp_path, checkpoint):
    inp = write_input(tmp_path / "in.h5", _many(800, seed=5))
    run_file(inp, tmp_path / "local.h5", checkpoint, runtime="torch", workers=0, progress=False)
    out = tmp_path / "ray.h5"
    cmd = ["run", str(inp), "--model", str(checkpoint), "--runtime", "torch", "-o", str(out), "-q"]
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.Popen(
        # Small actor calls: results come back (and are written) in steps of 32, not all at once.
        [sys.executable, "-c", CLI, *cmd, "--ray", "local", "--ray-batch", "32"],
        stderr=subprocess.PIPE,
        env=env,
    )
    partial = tmp_path / "ray.partial.h5"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and _done(partial) < 30:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        # A killed driver cannot stop its Ray; the test stops that one (found by its temp folder).
        _kill_processes_using(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert partial.exists() and not out.exists()
    result = CliRunner().invoke(main, [*cmd, "--workers", "0", "--resume"])
    assert result.exit_code == 0, result.output
    _assert_same_results(out, tmp_path / "local.h5")


def _assert_same_results(path, reference) -> None:
    """Statuses equal; energies and forces equal to float32 rounding (other batches, other sums)."""
    got, want = _read(path), _read(reference)
    np.testing.assert_array_equal(got["status"], want["status"])
    assert_close("energy", got["energy"], want["energy"], "other_batch", "float32")
    assert_close("forces", got["forces"], want["forces"], "other_batch", "float32")


def _kill_processes_using(folder: Path) -> None:
    """SIGKILL every process whose command line names ``folder`` (Linux /proc)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(folder) in (proc_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc_dir.name), signal.SIGKILL)


def test_without_ray_the_option_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    inp = write_input(tmp_path / "in.h5", _many(2))
    result = CliRunner().invoke(main, ["run", str(inp), "--ray", "local"])
    assert result.exit_code == 2 and "pip install 'painn-export[ray]'" in result.output


def test_relative_paths_from_another_directory_on_the_default_runtime(tmp_path, checkpoint, monkeypatch):
    """docs/ray.md's form: relative --model and input, ONNX Runtime (the default), from another folder.

    The driver starts no runtime and exports nothing: the actors export the
    checkpoint into their (here empty) cache, and their results say what ran.
    """
    work = tmp_path / "job"
    work.mkdir()
    inp = write_input(work / "in.h5", _many(40, seed=8))
    shutil.copy(checkpoint, work / "m.pt")
    local = run_file(inp, tmp_path / "local.h5", checkpoint, workers=0, progress=False)
    monkeypatch.chdir(work)
    cache = tmp_path / "actors-cache"
    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(cache))  # Ray starts here: its workers inherit it
    import painn_export.demo
    import painn_export.runners
    import pipelines.ray_run as ray_run

    def refuse(*_, **__):
        raise AssertionError("the driver exported or started a runtime")

    monkeypatch.setattr(painn_export.demo, "cached_onnx", refuse)
    monkeypatch.setattr(painn_export.runners.Runner, "activate", refuse)
    jobs, evaluate = [], ray_run.evaluate_on_ray
    monkeypatch.setattr(
        ray_run, "evaluate_on_ray", lambda job, *rest: jobs.append(job) or evaluate(job, *rest)
    )
    result = CliRunner().invoke(
        main, ["run", "in.h5", "--model", "m.pt", "-o", "ray.h5", "--ray", "local", "--json", "-q"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["runtime"] == local.runtime == "onnxruntime-cpu"
    assert 0 < summary["model_fraction"] < 1  # the actors' seconds in the runtime, reported back
    assert len(list(cache.glob("m-*.onnx"))) == 1  # exported by an actor
    # what the nodes are sent: absolute paths (a worker resolves a relative one in its own folder)
    assert jobs and jobs[0].input_path == str(work / "in.h5") and jobs[0].model_path == str(work / "m.pt")
    _assert_same_results(work / "ray.h5", tmp_path / "local.h5")
    with h5py.File(tmp_path / "local.h5") as a, h5py.File(work / "ray.h5") as b:
        assert {k: v for k, v in a.attrs.items() if k.startswith("fingerprint")} == {
            k: v for k, v in b.attrs.items() if k.startswith("fingerprint")
        }


class _StubRay:
    """What preflight reads of Ray: the alive nodes, and each node's answer to the probe."""

    def __init__(self, answers):
        self.answers = answers

    def nodes(self):
        return [{"Alive": True, "NodeID": f"n{k}", "NodeManagerAddress": f"10.0.0.{k}"} for k in range(2)]

    def remote(self, **_):
        stub = self

        class Probe:
            def options(self, **_):
                return self

            def remote(self, paths):
                return stub.answers.pop(0)

        return lambda fn: Probe()

    def get(self, refs):
        return refs


def test_preflight_names_the_node_and_what_it_lacks(tmp_path, monkeypatch):
    """Another package version, a missing file or another file at the same path: one line, before work."""
    from painn_export.version import __version__
    from pipelines.ray_cluster import PreflightError, node_facts, preflight

    monkeypatch.setitem(sys.modules, "ray.util.scheduling_strategies", type(sys)("stub"))
    sys.modules["ray.util.scheduling_strategies"].NodeAffinitySchedulingStrategy = lambda *a, **k: None
    path = tmp_path / "in.h5"
    path.write_bytes(b"structures")
    good = {**node_facts([str(path)]), "node": "gpu7"}
    assert good["version"] == __version__ and good["files"][str(path)][0] == len(b"structures")
    cases = {
        "runs painn-export 0.0.1": {**good, "node": "gpu7", "version": "0.0.1"},
        "cannot read": {**good, "node": "gpu7", "files": {str(path): (None, "No such file or directory")}},
        "sees another file": {**good, "node": "gpu7", "files": {str(path): (3, "abc")}},
    }
    for words, bad in cases.items():
        with pytest.raises(PreflightError, match=words) as caught:
            preflight(_StubRay([good, bad]), [str(path)])
        assert "gpu7 (10.0.0.1, Ray node n1)" in str(caught.value) and "\n" not in str(caught.value)
    nodes = preflight(_StubRay([good, good]), [str(path)])
    assert [n["name"] for n in nodes] == ["gpu7 (10.0.0.0, Ray node n0)", "gpu7 (10.0.0.1, Ray node n1)"]
    assert all(n["device_graphs"] for n in nodes)  # nvalchemi-toolkit-ops and Warp are dev dependencies


def _readme_cluster_command() -> str:
    """docs/ray.md's driver command for a cluster (the ``--ray auto`` line), continuation joined."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "ray.md").read_text()
    block = readme.split("# On a Ray cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    (line,) = [line for line in lines if "--ray auto" in line]
    return line.split("#", 1)[0].strip()


def test_the_readme_cluster_example_on_three_nodes(tmp_path, checkpoint, fresh_ray, monkeypatch):
    """docs/ray.md's cluster command, as written, on a head and two worker nodes of this machine.

    The default runtime (ONNX Runtime) on docs/ray.md's relative paths; the
    result equals the local pipeline's. Then a node whose Python finds
    another painn-export version joins: the same command is refused before
    any work, in one line naming that version and the node.
    """
    from ray.cluster_utils import Cluster

    from painn_export.checkpoint import load_model
    from painn_export.export import export_onnx

    command = _readme_cluster_command()
    assert command.startswith("cd /shared && painn-batch run structures.h5 --ray auto"), command
    shared = tmp_path / "shared"
    shared.mkdir()
    write_input(shared / "structures.h5", _many(300, seed=11))
    export_onnx(load_model(checkpoint), shared / "painn.onnx")
    local = tmp_path / "local.h5"
    run_file(shared / "structures.h5", local, shared / "painn.onnx", workers=0, progress=False)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        env = {
            **os.environ,
            "RAY_ADDRESS": cluster.address,  # what `ray start --head` leaves for `--ray auto` to find
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        script = command.replace("/shared", str(shared))
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["runtime"] == "onnxruntime-cpu" and summary["status_counts"]["ok"] == 300
        _assert_same_results(shared / "out.h5", local)

        # A fourth node finds another painn-export first on its path: a real other version.
        shadow = tmp_path / "other-version"
        shutil.copytree(
            Path(__file__).resolve().parents[1] / "painn_export",
            shadow / "painn_export",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        (shadow / "painn_export" / "version.py").write_text('__version__ = "0.0.0+other"\n')
        monkeypatch.setenv("PYTHONPATH", str(shadow))  # the node's processes inherit it
        odd = cluster.add_node(num_cpus=1)
        monkeypatch.delenv("PYTHONPATH")
        cluster.wait_for_nodes()
        (shared / "out.h5").unlink()
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "runs painn-export 0.0.0+other" in lines[0], done.stderr[-3000:]
    assert f"Ray node {odd.node_id[:8]})" in lines[0]  # the node: host, address and Ray's id
    assert not (shared / "out.h5").exists() and not (shared / "out.partial.h5").exists()


def test_results_from_an_actor_that_ran_something_else_are_refused(tmp_path):
    """What an actor reports with each result must be what the driver recorded: else one line, nothing
    written."""
    from pipelines.output import Fingerprint, Writer, create
    from pipelines.progress import Progress
    from pipelines.ray_columns import ActorMismatchError, commit, ragged
    from pipelines.run import Summary

    expected = {"package_version": "1.0", "model_sha256": "abc", "runtime": "onnxruntime-cpu"}
    path = tmp_path / "out.partial.h5"
    create(path, Fingerprint("x", 2, 6, "abc", "onnxruntime-cpu", "float32", False, "1.0"))
    writer = Writer(path, np.array([0, 3, 6]))

    def block(**report):
        ran_by = json.dumps({**expected, **report, "node": "gpu7", "gpu": ""})
        return {
            "index": np.arange(2),
            "energy": np.ones(2),
            "forces": ragged([np.ones((3, 3))] * 2),
            "stress": ragged([np.zeros((0, 3))] * 2),
            "status": np.array(["ok"] * 2, dtype=object),
            "message": np.array([""] * 2, dtype=object),
            "ran_by": np.array([ran_by] * 2, dtype=object),
            "model_seconds": np.array([0.5, 0.0]),
            "graph_seconds": np.array([0.25, 0.0]),
        }

    for wrong in ({"package_version": "0.9"}, {"model_sha256": "def"}, {"runtime": "onnxruntime-cuda"}):
        summary = Summary(n_structures=2)
        with pytest.raises(ActorMismatchError, match="on node gpu7") as caught:
            commit(block(**wrong), expected, writer, summary, Progress(2, enabled=False))
        (key,) = wrong
        assert f"{key}=" in str(caught.value) and "\n" not in str(caught.value)
        assert len(writer.pending()) == 2  # nothing written
    summary = Summary(n_structures=2)
    commit(block(), expected, writer, summary, Progress(2, enabled=False))
    assert len(writer.pending()) == 0 and summary.model_seconds == 0.5 and summary.atoms == 6
    assert summary.graph_seconds == 0.25  # the actors' device graph time, reported back
    writer.close()


def test_an_actor_takes_the_cpus_it_was_given_and_reports_what_ran(tmp_path, checkpoint, monkeypatch):
    """The graph task's tensor columns, then the inference actor, in this process (no Ray): the
    runtime gets the actor's CPUs as threads, every row says what computed it, and the results
    equal the local pipeline's."""
    from painn_export.checkpoint import file_sha256
    from painn_export.runners import describe
    from pipelines.batches import batch_limits
    from pipelines.graphs import GraphSettings
    from pipelines.ray_columns import ran_by
    from pipelines.ray_run import Inference, RayJob, graph_task

    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp_path / "cache"))
    inp = write_input(tmp_path / "in.h5", _many(20, seed=2))
    local = tmp_path / "local.h5"
    run_file(inp, local, checkpoint, workers=0, progress=False)
    identity, facts = describe(checkpoint, "onnxruntime", "cpu")
    settings = GraphSettings(facts.cutoff, facts.max_neighbors, facts.num_elements)
    expected = ran_by(identity, file_sha256(checkpoint))
    job = RayJob(
        str(inp), str(checkpoint), "onnxruntime", None, settings, batch_limits((), 4096, None), expected
    )
    actor = type("Inference", (Inference,), {"job": (job, "cpu", 2)})()
    assert actor.runner.threads == 2
    rows = graph_task({"id": np.array([0])}, np.arange(20), str(inp), settings)
    assert rows["positions"].dtype == object and rows["positions"][0].ndim == 2  # one array a row
    out = actor(rows)
    report = json.loads(out["ran_by"][0])
    assert {k: report[k] for k in expected} == expected and report["gpu"] == ""
    order = np.argsort(out["index"])
    want = _read(local)
    assert_close("energy", out["energy"][order], want["energy"], "repeat", "any")
    forces = np.concatenate([out["forces"][k] for k in order])
    assert_close("forces", forces, want["forces"], "repeat", "any")


def test_gpu_actors_need_that_many_gpus_of_one_kind():
    """--ray-gpus-per-actor beyond the cluster's GPUs waited for Ray Data's timeout, its warning
    hidden: now one line before any output exists, and GPUs of two kinds are refused too."""
    from pipelines.ray_cluster import ClusterError, check_gpus

    def node(gpus, kind="H100", alive=True, address="10.0.0.1"):
        resources = {"CPU": 16.0, "GPU": float(gpus)} if gpus else {"CPU": 16.0}
        if gpus:
            resources[f"accelerator_type:{kind}"] = 1.0
        return {"Alive": alive, "Resources": resources, "NodeManagerAddress": address}

    check_gpus([node(0)], RayOptions("auto", actors=4))  # CPU actors need no GPU
    check_gpus([node(2), node(2, address="10.0.0.2")], RayOptions("auto", actors=4, gpus_per_actor=1))
    with pytest.raises(ClusterError, match=r"GPUs each: 2\) can place 2 such actors"):
        check_gpus([node(2), node(2, alive=False)], RayOptions("auto", actors=4, gpus_per_actor=1))
    with pytest.raises(ClusterError, match=r"can place 0 such actors"):  # 3 GPUs, but one per node
        check_gpus([node(1), node(1), node(1)], RayOptions("auto", actors=1, gpus_per_actor=2))
    check_gpus([node(1)], RayOptions("auto", actors=2, gpus_per_actor=0.5))  # two actors share a GPU
    with pytest.raises(ClusterError, match=r"several kinds: A100 \(10.0.0.2\), H100 \(10.0.0.1\)"):
        check_gpus(
            [node(2), node(2, "A100", address="10.0.0.2")], RayOptions("auto", actors=2, gpus_per_actor=1)
        )


# --graphs device on Ray (issue 32): the actors build graphs and feeds on their own device from
# the structures' arrays. Warp's CPU backend stands in for a GPU, as in test_device_pipeline.

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def warp_cache(monkeypatch):
    """Warp's kernels from $WARP_CACHE_PATH (else the repository's .warp-cache), here and in the Ray
    started afterwards: its workers inherit the environment."""
    from painn_export.device_graphs import init_kernels

    cache = os.environ.get("WARP_CACHE_PATH") or str(ROOT / ".warp-cache")
    monkeypatch.setenv("WARP_CACHE_PATH", cache)
    init_kernels(cache)


@pytest.fixture
def one_thread():
    """Torch on one thread, as an actor with one CPU runs it: the same arithmetic for the local run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _outputs(path) -> dict:
    with h5py.File(path) as fh:
        out = {k: fh[k][...] for k in ("energy", "forces", "status", "message")}
        out["fingerprint"] = {k: str(v) for k, v in fh.attrs.items() if k.startswith("fingerprint")}
    return out


def _assert_bitwise(got: dict, want: dict) -> None:
    assert got["fingerprint"] == want["fingerprint"]
    for k in ("energy", "forces", "status", "message"):
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), f"{k} differs"


def test_ray_with_device_graphs_is_bitwise_the_host_graphs_and_the_local_run(
    tmp_path, checkpoint, fresh_ray, warp_cache, one_thread
):
    """One Ray chunk (< 128 structures: one actor call, so the local run's batches), bad structures
    among them, batches of at most 40 atoms (several device chunks, open batches carried): the
    statuses, messages, energies and forces of --ray with --graphs device are bit for bit those of
    --ray with host graphs and of the local run, with the same fingerprint."""
    _, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", _many(50, seed=4) + rows)
    options = dict(runtime="torch", progress=False, max_atoms=40)
    local = run_file(inp, tmp_path / "local.h5", checkpoint, workers=0, graphs="host", **options)
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # one Ray for both runs
    on_ray = RayOptions("local", cpus=2)
    summaries = {
        graphs: run_file(inp, tmp_path / f"{graphs}.h5", checkpoint, graphs=graphs, ray=on_ray, **options)
        for graphs in ("host", "device")
    }
    assert summaries["device"].graphs == "device (Ray actors on cpu)" and summaries["host"].graphs == "host"
    assert summaries["device"].graph_seconds > 0 and summaries["host"].graph_seconds == 0  # actors' time
    assert summaries["device"].counts == summaries["host"].counts == local.counts
    assert local.counts["ok"] == 50 + len(rows) - len(expected_bad)
    want = _outputs(tmp_path / "local.h5")
    _assert_bitwise(_outputs(tmp_path / "host.h5"), want)
    _assert_bitwise(_outputs(tmp_path / "device.h5"), want)


def test_ray_device_graphs_across_chunks_resume_a_local_run(
    tmp_path, checkpoint, monkeypatch, fresh_ray, warp_cache, one_thread
):
    """300 structures (three read tasks, actor calls of 64 rows, so rows from two tasks meet in one
    call), every batch one structure (12 atoms each, --max-atoms 12: batches that do not depend on
    Ray's calls), bad structures among them. A local host run stopped after 100 batches leaves some
    statuses pending among the done ones; --ray --graphs device --resume completes it, bit for bit
    an uninterrupted local run."""
    import pipelines.batches as batches
    from painn_export.samples import bulk
    from pipelines.run import RunInterruptedError
    from pipelines.signals import Stopped

    rng = np.random.default_rng(6)
    good = [bulk(rng, 12, np.arange(1, 30)) for _ in range(290)]
    good = [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in good]
    _, rows, expected_bad = _structures()
    bad = rows[-len(expected_bad) :]
    structures = good[:60] + bad + good[60:200] + bad + good[200:]
    inp = write_input(tmp_path / "in.h5", structures)
    options = dict(runtime="torch", progress=False, max_atoms=12)
    whole = run_file(inp, tmp_path / "whole.h5", checkpoint, workers=0, graphs="host", **options)
    assert whole.counts["ok"] == 290

    infer_split, calls = batches.infer_split, {"n": 0}

    def stop_after_100_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 100:
            raise Stopped(signal.SIGINT, safe=True)
        return infer_split(*args, **kwargs)

    out = tmp_path / "out.h5"
    with monkeypatch.context() as patch, pytest.raises(RunInterruptedError):
        patch.setattr(batches, "infer_split", stop_after_100_batches)
        run_file(inp, out, checkpoint, workers=0, graphs="host", **options)
    with h5py.File(out.with_name("out.partial.h5")) as fh:
        pending = np.flatnonzero(fh["status"][...] == 0)
    assert 0 < pending[0] < 100 < pending.size  # done ones before and between pending ones:
    assert np.any(np.diff(pending) > 1)  # not one range (the read tasks gather)

    summary = run_file(inp, out, checkpoint, graphs="device", resume=True,
                       ray=RayOptions("local", cpus=2, actor_batch=64), **options)  # fmt: skip
    assert summary.graphs == "device (Ray actors on cpu)"
    assert summary.already_done == len(structures) - pending.size and summary.computed == pending.size
    _assert_bitwise(_outputs(out), _outputs(tmp_path / "whole.h5"))


def test_a_device_graph_actor_gets_structures_and_builds_the_graphs(
    tmp_path, checkpoint, monkeypatch, warp_cache
):
    """The read task's columns, then the inference actor, in this process (no Ray): with device
    graphs the rows are the structures' own arrays (no graph built on the host or shipped), and
    the actor's results, statuses and messages are bit for bit the host-graph actor's on the same rows."""
    import pipelines.graphs
    from painn_export.checkpoint import file_sha256
    from painn_export.runners import describe
    from pipelines.batches import batch_limits
    from pipelines.graphs import GraphSettings
    from pipelines.ray_columns import STRUCTURE_COLUMNS, ran_by
    from pipelines.ray_run import Inference, RayJob, graph_task, structure_task

    monkeypatch.setenv("PAINN_EXPORT_CACHE", str(tmp_path / "cache"))
    _, rows, expected_bad = _structures()
    inp = write_input(tmp_path / "in.h5", rows + _many(30, seed=2))
    identity, facts = describe(checkpoint, "onnxruntime", "cpu")
    settings = GraphSettings(facts.cutoff, facts.max_neighbors, facts.num_elements)
    job = RayJob(str(inp), str(checkpoint), "onnxruntime", None, settings, batch_limits((), 60, None),
                 ran_by(identity, file_sha256(checkpoint)))  # fmt: skip
    out = {}
    for graphs in ("host", "device"):
        on_device = graphs == "device"
        actor = type("Inference", (Inference,), {"job": (replace(job, device_graphs=on_device), "cpu", 1)})()
        if on_device:

            def no_host_graphs(*_, **__):
                raise AssertionError("a graph was built on the host")

            monkeypatch.setattr(pipelines.graphs, "structure_item", no_host_graphs)
            columns = structure_task({"id": np.array([0])}, np.arange(len(rows) + 30), str(inp))
            assert set(columns) == set(STRUCTURE_COLUMNS)
            assert columns["positions"].dtype == object  # one array a row
            assert columns["positions"][0].shape == (len(rows[0][0]), 3)
        else:
            columns = graph_task({"id": np.array([0])}, np.arange(len(rows) + 30), str(inp), settings)
        out[graphs] = actor(columns)
    host, device = out["host"], out["device"]
    assert device["graph_seconds"][0] > 0 and host["graph_seconds"].sum() == 0
    order_host, order_device = np.argsort(host["index"]), np.argsort(device["index"])
    for name in ("index", "status", "message"):
        assert list(host[name][order_host]) == list(device[name][order_device]), name
    assert host["energy"][order_host].tobytes() == device["energy"][order_device].tobytes()
    for a, b in zip(host["forces"][order_host], device["forces"][order_device]):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    statuses = dict(zip(device["index"], device["status"]))
    assert [statuses[k] for k in range(len(rows) - len(expected_bad), len(rows))] == expected_bad


def test_where_the_actors_build_graphs():
    """--graphs on Ray: host never; device always, every node that could hold an actor having
    device graphs installed, else one line naming the node; auto only with GPU actors (and the host
    when a node lacks them)."""
    from pipelines.ray_cluster import PreflightError, graphs_on_actors

    def node(name, cpus=2, gpus=0, installed=True):
        resources = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
        return {"name": name, "resources": resources, "device_graphs": installed}

    cpu_actors, gpu_actors = RayOptions("auto"), RayOptions("auto", gpus_per_actor=1)
    nodes = [node("a"), node("b", gpus=1)]
    choices = ("host", "device", "auto")
    assert [graphs_on_actors(g, cpu_actors, nodes) for g in choices] == [False, True, False]
    assert [graphs_on_actors(g, gpu_actors, nodes) for g in choices] == [False, True, True]
    lacking = [node("head", cpus=0, installed=False), node("cpu1", installed=False), node("gpu1", gpus=1)]
    # GPU actors only run on gpu1; the head has no CPU for any actor
    assert graphs_on_actors("device", gpu_actors, lacking) and graphs_on_actors("auto", gpu_actors, lacking)
    assert not graphs_on_actors("auto", RayOptions("auto"), lacking)
    with pytest.raises(PreflightError, match=r"node cpu1 cannot build graphs on its device") as caught:
        graphs_on_actors("device", cpu_actors, lacking)
    assert "pip install 'painn-export[device-graphs]'" in str(caught.value) and "\n" not in str(caught.value)
