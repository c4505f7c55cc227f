"""The GPU check: environment, parity, determinism, throughput and the pipeline, in one command.

    make gpu-check                                   # a machine with an NVIDIA GPU and its own PyTorch
    python scripts/gpu_check.py --device cpu --quick --out DIR      # the CI smoke test (tests/)

It installs nothing and never touches the machine's PyTorch (2.11 or newer).
What it needs beyond PyTorch (vesin, onnxscript, ...) comes as wheels made
beforehand with ``pip download`` (docs/gpu.md, "The GPU check"); ``make gpu-check``
unpacks them into a folder of its own. It writes ``DIR/gpu_check.json`` and
``DIR/gpu_check.md``:

- the environment: GPU, driver, torch, CUDA, onnxruntime's providers;
- parity: the demo model and random OCP-size models (direct; gradient with
  stress), float32 on the device against float64 on the CPU, within the
  tolerance table, and a bitwise repeat on the device (painn_export.parity);
- throughput of each runtime present (eager, ``torch.compile``, ONNX
  Runtime on the device's provider) at the demo size (10k and 100k atoms)
  and the OCP size (5k and 20k atoms): atoms/s (median of 3, with the
  spread) and the peak device memory;
- end to end, ``painn-batch run`` on a generated file (20k structures):
  with device graphs (issue 32), the demo model and the OCP-size model at
  the OCP graph settings (12 Å, cap 50), atoms/s and the shares of the wall
  time the device spent building graphs and in the model; with host graphs,
  structures/s, the fraction of the wall time spent in the model, and how
  many neighbour workers it took.

AOTInductor (``painn-export aoti``) is measured beside them when a C++
compiler is there (not with ``--quick``). ``--quick`` shrinks every size so that it runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = {"demo": (10_000, 100_000), "ocp": (5_000, 20_000), "structures": 20_000, "repeats": 3}
QUICK = {"demo": (300,), "ocp": (200,), "structures": 48, "repeats": 2, "quick": True}


def environment(device: str) -> dict:
    import torch

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm {props.major}.{props.minor}"
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown (no nvidia-smi)"
    try:
        import onnxruntime

        env["onnxruntime"] = f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}"
    except ImportError:
        env["onnxruntime"] = "not installed"
    return env


def models(quick: bool) -> dict:
    """name -> (model, stress): the demo model, and random OCP-size ones (seed 0)."""
    import torch

    from painn_export.checkpoint import load_model
    from painn_export.config import PRESETS
    from painn_export.demo import demo_model_path
    from painn_export.model import PaiNN

    ocp = PRESETS["ocp"]
    if quick:  # the OCP architecture, narrow and shallow
        ocp = dataclasses.replace(ocp, hidden_channels=32, num_layers=2, num_rbf=16, cutoff=6.0)
    out = {"demo": (load_model(demo_model_path()), False)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out["ocp-direct"] = (PaiNN(ocp).eval(), False)
        torch.manual_seed(0)
        out["ocp-gradient"] = (PaiNN(dataclasses.replace(ocp, direct_forces=False)).eval(), True)
    return out


def parity(device: str, quick: bool, zoo: dict) -> list[dict]:
    from painn_export.parity import run_parity
    from painn_export.runners import TorchRunner
    from painn_export.samples import example_set

    rows = []
    for name, (model, stress) in zoo.items():
        samples = example_set(seed=0, num_elements=model.config.num_elements, large=0 if quick else 256)
        runner = TorchRunner(model, device=device, dtype="float32", stress=stress)
        for row in run_parity(model, [(runner, "float32")], samples):
            rows.append({"model": name, **row.as_dict()})
    return rows


def batch(config, n_atoms: int):
    """Periodic structures of 80-120 atoms up to ``n_atoms``: the batch of scripts/bench_runtimes.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_runtimes import make_batch

    return make_batch(config, n_atoms)


class CompiledRunner:
    """``torch.compile`` of the eager model (dynamic shapes), behind the runner interface."""

    def __new__(cls, model, device, stress):
        import torch

        from painn_export.runners import TorchRunner

        runner = TorchRunner(model, device=device, dtype="float32", stress=stress)
        activate = runner._activate

        def compiled_activate():
            activate()
            runner.model.forward = torch.compile(runner.model.forward, dynamic=True)

        runner._activate = compiled_activate
        runner.name = "torch.compile"
        return runner


def runners_for(model, stress: bool, device: str, tmp: Path, compile_it: bool | str = True) -> dict:
    """Each runtime present here, by name, exported or compiled once for ``device`` (``cuda:N``
    included): ONNX Runtime only on a provider for ``device``; ``compile_it``: torch.compile too,
    and with ``"all"`` AOTInductor as well."""
    from painn_export.aoti import export_aoti, have_compiler
    from painn_export.export import export_onnx
    from painn_export.runners import AOTInductorRunner, OnnxRuntimeRunner, TorchRunner

    out = {"eager": lambda: TorchRunner(model, device=device, dtype="float32", stress=stress)}
    if compile_it:
        out["torch.compile"] = lambda: CompiledRunner(model, device, stress)
    if compile_it == "all" and have_compiler():
        target = device if device.startswith("cuda") else "cpu"  # cuda:N: compiled on that GPU
        package = export_aoti(model, tmp / f"{id(model)}.pt2", device=target, stress=stress)
        out["aoti"] = lambda: AOTInductorRunner(package, device=device)
    try:
        import onnxruntime

        if device == "cpu" or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            path = export_onnx(model, tmp / f"{id(model)}.onnx", stress=stress)
            out["onnxruntime"] = lambda: OnnxRuntimeRunner(path, device=device)
    except ImportError:
        pass
    return out


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def throughput(device: str, sizes: dict, zoo: dict, repeats: int) -> list[dict]:
    import torch

    rows = []
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, stress) in zoo.items():
            config = "demo" if name == "demo" else "ocp"
            if name == "ocp-gradient":
                continue  # the direct OCP model stands for the OCP size; the gradient one is in parity
            # --quick compiles the demo model only, and not ahead of time: the smoke test stays short
            compile_it = "all" if not sizes.get("quick") else name == "demo"
            try:  # exported and compiled once per model, then timed at every size
                made = runners_for(model, stress, device, Path(tmp), compile_it)
            except Exception as exc:  # an export that fails here is reported, not fatal
                rows.append({"model": name, "atoms": 0, "runtime": "export", "error": _error(exc)})
                continue
            for n_atoms in sizes[config]:
                feed = batch(model.config, n_atoms)
                for runtime, make in made.items():
                    row = {"model": name, "atoms": len(feed["positions"]), "runtime": runtime}
                    try:
                        runner = make()
                        with runner:
                            runner.infer(feed)  # warm-up (and compile)
                            if cuda:
                                torch.cuda.reset_peak_memory_stats(device)
                            times = []
                            for _ in range(repeats):
                                start = time.perf_counter()
                                runner.infer(feed)
                                times.append(time.perf_counter() - start)
                            row["provider"] = runner.provider
                        median = statistics.median(times)
                        row.update(
                            median_s=median,
                            spread_s=max(times) - min(times),
                            atoms_per_s=row["atoms"] / median,
                            peak_device_mb=torch.cuda.max_memory_allocated(device) / 2**20
                            if cuda and runtime != "onnxruntime"
                            else None,
                        )
                    except Exception as exc:  # a runtime that fails here is reported, not fatal
                        row["error"] = _error(exc)
                    rows.append(row)
                    if cuda:
                        torch.cuda.empty_cache()
    return rows


def pipeline(device: str, n_structures: int, zoo: dict | None = None) -> list[dict]:
    """``painn-batch run`` on a generated file: device graphs (the demo model, and ``zoo``'s OCP-size
    direct model at its graph settings), then host graphs with 1, 2, 4, ... neighbour workers."""
    from painn_export.samples import example_set
    from painn_export.schema import write_input
    from pipelines.run import run_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        seed = 0
        while len(samples) < n_structures:
            samples += [s for s in example_set(seed=seed, sizes=(8, 24, 48)) if s.name != "large"]
            seed += 1
        path = write_input(
            Path(tmp) / "in.h5",
            [(s.atomic_numbers, s.positions, s.cell, s.pbc) for s in samples[:n_structures]],
        )
        runtime = "torch" if device.startswith("cuda") else "onnxruntime"
        rows += device_graph_rows(path, Path(tmp), runtime, device, zoo)
        workers = 1
        while workers <= max(1, min(8, (os.cpu_count() or 2) - 1)):
            out = Path(tmp) / f"out{workers}.h5"
            summary = run_file(
                path, out, None, runtime=runtime, device=device, workers=workers, progress=False
            ).as_dict()
            rows.append(
                {
                    "workers": workers,
                    "graphs": "host",
                    "runtime": summary["runtime"],
                    "device": summary["device"],
                    "structures_per_s": summary["structures_per_s"],
                    "atoms_per_s": summary["atoms_per_s"],
                    "model_fraction": summary["model_fraction"],
                    "seconds": summary["seconds"],
                }
            )
            if summary["model_fraction"] and summary["model_fraction"] >= 0.8:
                break  # the model is busy enough: more workers would not help
            workers *= 2
    return rows


def device_graph_rows(
    path: Path, tmp: Path, runtime: str, device: str, zoo: dict | None = None
) -> list[dict]:
    """``painn-batch run --graphs device`` (issue 32): the graphs and the feed on the device, the host
    only reading and writing; a row saying why not where device graphs are not installed.

    One row with the demo model on ``runtime``, and one with ``zoo``'s OCP-size direct model
    (``ocp-direct``: the OCP graph settings, 12 Å and cap 50, in the full check) on PyTorch, saved
    here as a checkpoint. Each row: atoms/s, and the shares of the wall time in the device's graph
    building, in the model, and the two together (how busy the device was, from wall-clock timers
    around its calls, not a GPU counter).
    """
    import importlib.util

    from painn_export import save_model
    from pipelines.run import run_file

    if importlib.util.find_spec("nvalchemiops") is None:
        return [{"workers": 0, "graphs": "device: not installed (painn-export[device-graphs])"}]
    from painn_export.checkpoint import load_model
    from painn_export.demo import demo_model_path

    runs = [("demo", None, runtime, load_model(demo_model_path()).config)]
    if zoo and "ocp-direct" in zoo:
        ocp = zoo["ocp-direct"][0]
        runs.append(("ocp-direct", save_model(ocp, tmp / "ocp-direct.pt"), "torch", ocp.config))
    rows = []
    for name, model_path, how, config in runs:
        summary = run_file(
            path, tmp / f"out-device-{name}.h5", model_path, runtime=how, device=device, graphs="device",
            workers=0, progress=False,
        )  # fmt: skip
        report = summary.as_dict()
        model, graphs = report["model_fraction"] or 0.0, report.get("device_graph_fraction") or 0.0
        rows.append(
            {
                "workers": 0,
                "model": name,
                "cutoff": config.cutoff,
                "max_neighbors": config.max_neighbors,
                "graphs": report.get("graphs", "device"),
                "runtime": report["runtime"],
                "device": report["device"],
                "structures_per_s": report["structures_per_s"],
                "atoms_per_s": report["atoms_per_s"],
                "model_fraction": report["model_fraction"],
                "device_graph_fraction": report.get("device_graph_fraction"),
                "device_busy_fraction": round(model + graphs, 3),
                "seconds": report["seconds"],
            }
        )
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check, {env['date']}", "", f"`{report['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "date"]
    for section, error in report.get("errors", {}).items():
        lines += ["", f"**The {section} section failed**: {error}"]
    lines += ["", "## Parity (float32 on the device against float64 on the CPU; repeat: bitwise)", ""]
    lines += [
        "| model | runtime | quantity | max abs | max rel | passed |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in report["parity"]:
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['quantity']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
            f"{'yes' if r['passed'] else 'NO'} |"
        )
    lines += ["", "## Throughput (median of the timed runs, spread = max - min)", ""]
    lines += ["| model | atoms | runtime | provider | median | spread | atoms/s | peak device memory |"]
    lines += ["| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["throughput"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['atoms']} | {r['runtime']} | {r['error']} | | | | |")
            continue
        mem = f"{r['peak_device_mb']:.0f} MB" if r["peak_device_mb"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['atoms']} | {r['runtime']} | {r['provider']} | {1000 * r['median_s']:.1f} ms | "
            f"{1000 * r['spread_s']:.1f} ms | {r['atoms_per_s']:.0f} | {mem} |"
        )
    lines += ["", "## painn-batch run end to end", ""]
    lines += [
        "The model's share of the wall time is the time inside the runtime's inference calls "
        "(host-device copies included): a proxy for how busy the GPU is, not a GPU counter.",
        "",
    ]
    lines += [
        "| model | graphs | workers | runtime | device | structures/s | atoms/s | time in the model / wall "
        "time | building graphs on the device / wall time | device busy (the two) |"
    ]
    lines += ["| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["pipeline"]:
        lines.append(
            f"| {r.get('model', 'demo')}{_settings(r)} | {r.get('graphs', 'host')} | {r['workers']} | {r.get('runtime', '')} | "
            f"{r.get('device', '')} | {r.get('structures_per_s', '')} | {r.get('atoms_per_s', '')} | "
            f"{r.get('model_fraction', '')} | {r.get('device_graph_fraction', '')} | "
            f"{r.get('device_busy_fraction', '')} |"
        )
    return "\n".join(lines) + "\n"


def _settings(row: dict) -> str:
    """`` (12 Å, cap 50)``: a device-graph row's graph settings, for the table."""
    return f" ({row['cutoff']:g} Å, cap {row['max_neighbors']})" if "cutoff" in row else ""


def write_report(report: dict, out: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` with what is done so far (each written whole)."""
    from painn_export.files import written_whole

    with written_whole(out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    with written_whole(out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"))
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {args.device}, but torch {torch.__version__} sees no GPU", file=sys.stderr
        )
        return 2
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(args.device),
        "parity": [],
        "throughput": [],
        "pipeline": [],
    }
    zoo = models(args.quick)
    sections = (
        ("parity", lambda: parity(args.device, args.quick, zoo)),
        ("throughput", lambda: throughput(args.device, sizes, zoo, sizes["repeats"])),
        ("pipeline", lambda: pipeline(args.device, sizes["structures"], zoo)),
    )
    for name, run in sections:  # the report is written after each section: a failure keeps the others
        try:
            report[name] = run()
        except Exception as exc:
            report.setdefault("errors", {})[name] = _error(exc)
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_report(report, args.out)
    failed = [r for r in report["parity"] if not r["passed"]] + list(report.get("errors", {}))
    print(
        f"gpu_check: {len(report['parity'])} parity rows ({len(failed)} failed), "
        f"{len(report['throughput'])} throughput rows, {report['seconds']} s; wrote {args.out}/gpu_check.md"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
