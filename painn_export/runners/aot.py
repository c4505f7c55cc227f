"""An AOTInductor package (``.pt2``, :mod:`painn_export.aoti`) on the device it was compiled for."""

from __future__ import annotations

import json
from pathlib import Path

from painn_export.errors import RuntimeUnavailableError
from painn_export.runners.base import Runner, is_tensor, parse_device, runner_name
from painn_export.runners.eager import torch_device


class AOTInductorRunner(Runner):
    """A compiled ``.pt2`` package, run in this process on the CPU or one GPU.

    ``device``: ``auto`` is the package's own device kind; a package compiled
    for another torch, device or GPU is refused in one line before its code
    is loaded, and so is a ``cuda:N`` this process has no GPU for.
    ``threads`` sets torch's intra-op threads (the CPU package's OpenMP loops
    use them), put back when it deactivates.
    """

    runtime = name = "aoti"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        super().__init__()
        parse_device(device)
        self.path, self.requested, self.threads = Path(path), device, threads

    def _activate(self) -> None:
        import torch

        from painn_export.aoti import load_package, read_package_facts
        from painn_export.metadata import model_facts

        kind, index = parse_device(self.requested)
        built = read_package_facts(self.path).get("device", "cpu")
        if kind == "auto":
            kind = built
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError(
                f"{self.path} runs on device {built}, and torch {torch.__version__} sees no GPU here"
                + ("" if built == "cuda" else "; use --device cpu or auto")
            )
        self.device, self.provider, self.gpu = torch_device(
            f"cuda:{index}" if kind == "cuda" else "cpu", "aoti"
        )
        self._threads_before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide: put back by deactivate()
        try:
            self.model, facts = load_package(self.path, self.device)
        except BaseException:
            torch.set_num_threads(self._threads_before)
            raise
        meta = facts["metadata"]
        info = model_facts(meta, self.path)
        self.readout, self.precision = info.readout, info.precision
        self.input_names = tuple(json.loads(meta["painn_export.inputs"]))
        self.output_names = tuple(json.loads(meta["painn_export.outputs"]))
        self.name = runner_name("aoti", self.provider)
        self._torch = torch

    def free_memory(self) -> None:
        if self.provider == "cuda":
            self._torch.cuda.empty_cache()

    def _infer(self, feed):
        torch = self._torch
        if is_tensor(feed["positions"]):  # already on its device
            inputs = list(self._tensor_inputs(feed).values())
        else:
            inputs = [torch.from_numpy(a).to(self.device) for a in self._inputs(feed).values()]
        with torch.no_grad():
            outputs = self.model(*inputs)
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, outputs)}

    def _deactivate(self) -> None:
        self.model = None
        self.free_memory()
        self._torch.set_num_threads(self._threads_before)
