"""Eager PyTorch: the scatter-free model itself, on the CPU or a CUDA GPU."""

from __future__ import annotations

from painn_export.contract import input_names, output_names
from painn_export.errors import RuntimeUnavailableError
from painn_export.readout import SystemReadout
from painn_export.runners.base import Runner, is_tensor, parse_device, runner_name


def torch_device(requested: str, runtime: str) -> tuple[str, str, str]:
    """``(device, provider, gpu name)`` torch gives for ``requested``; a GPU it cannot see is refused.

    ``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda:N`` beyond
    the GPUs torch sees is one line naming how many it sees, never the CPU.
    """
    import torch

    kind, index = parse_device(requested)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return "cpu", "cpu", ""
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise RuntimeUnavailableError(
            f"{runtime}: no CUDA device {index} (torch {torch.__version__} sees "
            f"{torch.cuda.device_count()}); use --device cpu or auto"
        )
    return f"cuda:{index}", "cuda", torch.cuda.get_device_name(index)


class TorchRunner(Runner):
    """Eager PyTorch: the scatter-free model on CPU or CUDA, in float64, float32, float16 or bfloat16.

    ``device`` is ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a CUDA device that torch cannot see is refused, never
    replaced by the CPU. ``stress=True`` (gradient-force models) returns
    stress. The caller's model is left as it is: the runner casts its own copy.
    """

    runtime = "torch"

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", stress: bool = False) -> None:
        super().__init__()
        parse_device(device)
        self.source, self.requested, self.dtype = model, device, dtype
        self.precision = dtype
        self.name = f"torch-{dtype}"
        self.input_names = input_names(model.gradient_forces)
        self.output_names = output_names(stress)
        self.readout = SystemReadout.of(model.normalization)

    def _activate(self) -> None:
        import copy

        import torch

        self.device, self.provider, self.gpu = torch_device(self.requested, "torch")
        self.name = runner_name("torch", self.provider, self.dtype)
        self.model = (
            copy.deepcopy(self.source).to(device=self.device, dtype=getattr(torch, self.dtype)).eval()
        )

    def _deactivate(self) -> None:
        self.model = None
        self.free_memory()

    def free_memory(self) -> None:
        if self.provider == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _infer(self, feed):
        if not is_tensor(feed["positions"]):
            return self.model.per_atom(feed, virial=self.has_stress)  # copied to the host: synchronised
        return self._per_atom_tensors(feed)

    def _per_atom_tensors(self, feed):
        """``model.per_atom`` of a feed already on the device: floats in the model's dtype, as it casts."""
        import torch

        from painn_export.slots import GraphInputs

        weight = self.model.atom_emb.embeddings.weight
        names = input_names(self.model.gradient_forces)
        graph = GraphInputs(
            **{n: feed[n].to(weight.dtype) if feed[n].is_floating_point() else feed[n] for n in names}
        )
        with torch.inference_mode(self.model.config.direct_forces):  # gradient forces need autograd
            outputs = self.model(graph, virial=self.has_stress)
        wide = torch.promote_types(weight.dtype, torch.float32)  # numpy has no bfloat16
        return {n: t.detach().to(wide).cpu().numpy() for n, t in zip(output_names(self.has_stress), outputs)}
