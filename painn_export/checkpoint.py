"""Reading OCP/fairchem PaiNN checkpoints, and our own model format.

OCP/fairchem trainers save ``{"state_dict", "config", "normalizers", ...}``
(optionally ``"ema"``, ``"scale_dict"``, ``"elementrefs"``). We read:

- the weights, with any number of ``module.`` prefixes (DataParallel/DDP);
- the hyperparameters from ``config["model_attributes"]`` (OCP, where
  ``config["model"]`` is the name) or ``config["model"]`` (fairchem, a dict
  with ``name``);
- the fitted per-layer scale factors, from the state_dict, from
  ``checkpoint["scale_dict"]`` (which upstream lets override the state_dict),
  or from an older separate scale file (``.json``/``.pt``);
- the EMA weights when the checkpoint has them: the upstream trainer that
  wrote such a checkpoint predicts with them;
- the energy/force normalisers (``target``/``energy``, ``grad_target``/
  ``forces``; ``mean`` with ``std`` or ``rmsd``) and linear element
  references, so outputs are in eV and eV/Å.

Anything not understood raises :class:`CheckpointError` naming the key.

The native format (:func:`save_model`/:func:`load_model`) is a torch file
holding only plain data: format tag, config, normalisation, state_dict and
provenance. It loads with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from painn_export.config import PaiNNConfig, TargetNormalization
from painn_export.files import file_sha256, written_whole
from painn_export.model import PaiNN

log = logging.getLogger(__name__)

NATIVE_FORMAT = "painn-export-model"
NATIVE_FORMAT_VERSION = 1

# Upstream constructor arguments that only concern the trainer or graph
# batching, accepted and not used here.
_IGNORED_MODEL_KEYS = frozenset(
    {"name", "num_atoms", "bond_feat_dim", "num_targets", "use_pbc_single", "scale_file"}
)
_SCALAR_MODEL_KEYS = (
    "hidden_channels",
    "num_layers",
    "num_rbf",
    "cutoff",
    "max_neighbors",
    "regress_forces",
    "direct_forces",
    "use_pbc",
    "otf_graph",
    "num_elements",
)
_NORMALIZER_KEYS = {"target": "energy", "energy": "energy", "grad_target": "forces", "forces": "forces"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be interpreted; the message names the key."""


def _package_version() -> str:
    from painn_export.version import __version__

    return __version__


def _torch_load(path: Path, trusted: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only "Unsupported global" means a valid pickle holding Python objects.
        if "Unsupported global" not in str(exc):
            raise CheckpointError(f"{path}: not a readable torch checkpoint") from exc
        if not trusted:
            raise CheckpointError(
                f"{path}: holds Python objects beyond tensors and plain data, which "
                "torch refuses to unpickle safely; if you trust this file, load it with "
                "trusted=True (CLI: --trust-checkpoint)"
            ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------
# OCP / fairchem checkpoints
# --------------------------------------------------------------------------


def config_from_ocp(config: Mapping[str, Any]) -> tuple[PaiNNConfig, str | None]:
    """PaiNN hyperparameters and scale-file path from an OCP/fairchem trainer config."""
    model = config.get("model")
    if isinstance(model, str):
        name, attrs = model, dict(config.get("model_attributes") or {})
        where = "config['model_attributes']"
    elif isinstance(model, Mapping):
        attrs = dict(model)
        name = attrs.get("name")
        where = "config['model']"
    else:
        raise CheckpointError("checkpoint config has no 'model' entry naming the model")
    if not isinstance(name, str) or name.lower() not in ("painn", "painn_backbone"):
        raise CheckpointError(
            f"config['model'] names {name!r}; only PaiNN checkpoints ('painn') are supported "
            "(hydra/multi-head checkpoints are not)"
        )

    kwargs: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in _IGNORED_MODEL_KEYS:
            continue
        if key in _SCALAR_MODEL_KEYS:
            kwargs[key] = value
        elif key == "rbf":
            kwargs["rbf"] = _named_option(value, f"{where}['rbf']", allowed_extra=("pregamma_initial",))[0]
        elif key == "envelope":
            env_name, extra = _named_option(value, f"{where}['envelope']", allowed_extra=("exponent",))
            kwargs["envelope"] = env_name
            if "exponent" in extra:
                kwargs["envelope_exponent"] = int(extra["exponent"])
        else:
            raise CheckpointError(f"unknown PaiNN hyperparameter {where}[{key!r}] = {value!r}")
    try:
        cfg = PaiNNConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid PaiNN hyperparameters in {where}: {exc}") from exc
    return cfg, attrs.get("scale_file")


def _named_option(value: Any, where: str, allowed_extra: tuple[str, ...]) -> tuple[str, dict]:
    if not isinstance(value, Mapping) or "name" not in value:
        raise CheckpointError(f"{where} must be a mapping with a 'name', got {value!r}")
    extra = {k: v for k, v in value.items() if k != "name"}
    for k in extra:
        if k not in allowed_extra:
            raise CheckpointError(f"unsupported option {where}[{k!r}] = {extra[k]!r}")
    return str(value["name"]).lower(), extra


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _read_scale_file(path: Path) -> dict[str, float]:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data.pop("comment", None)
    elif path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"scale file {path}: unsupported extension {path.suffix!r} (.json or .pt)")
    if not isinstance(data, Mapping):
        raise CheckpointError(f"scale file {path}: expected a mapping of name -> factor")
    return {str(k): float(v) for k, v in data.items()}


def _apply_scales(
    state_dict: dict[str, torch.Tensor], scales: Mapping[str, float], num_layers: int, source: str
) -> None:
    valid = {f"upd_out_scalar_scale_{i}" for i in range(num_layers)}
    for name, value in scales.items():
        if name not in valid:
            raise CheckpointError(
                f"{source}: unknown scale factor {name!r} (expected one of {sorted(valid)})"
            )
        state_dict[f"{name}.scale_factor"] = torch.tensor(float(value), dtype=torch.float32)


def _normalization_from_ocp(checkpoint: Mapping[str, Any]) -> TargetNormalization:
    values: dict[str, float] = {}
    for key, state in (checkpoint.get("normalizers") or {}).items():
        target = _NORMALIZER_KEYS.get(key)
        if target is None:
            raise CheckpointError(f"checkpoint['normalizers'][{key!r}]: unknown target (energy/forces only)")
        if not isinstance(state, Mapping) or "mean" not in state:
            raise CheckpointError(f"checkpoint['normalizers'][{key!r}] has no 'mean'")
        std_key = "rmsd" if "rmsd" in state else "std" if "std" in state else None
        if std_key is None:
            raise CheckpointError(f"checkpoint['normalizers'][{key!r}] has neither 'std' nor 'rmsd'")
        values[f"{target}_mean"] = _as_float(state["mean"], f"normalizers[{key!r}]['mean']")
        values[f"{target}_std"] = _as_float(state[std_key], f"normalizers[{key!r}][{std_key!r}]")

    refs: tuple[float, ...] = ()
    for key, state in (checkpoint.get("elementrefs") or {}).items():
        if key != "energy":
            raise CheckpointError(f"checkpoint['elementrefs'][{key!r}]: only energy references are supported")
        if not isinstance(state, Mapping) or "element_references" not in state:
            raise CheckpointError("checkpoint['elementrefs']['energy'] has no 'element_references'")
        refs = tuple(float(v) for v in torch.as_tensor(state["element_references"]).reshape(-1))
    return TargetNormalization(**values, element_references=refs)


def _as_float(value: Any, where: str) -> float:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.numel() != 1 or not math.isfinite(float(tensor)):
        raise CheckpointError(f"checkpoint {where} must be one finite number, got {value!r}")
    return float(tensor)


def _ema_weights(model: PaiNN, ema: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map upstream EMA ``shadow_params`` (trainable parameters, in order) to names."""
    shadow = ema.get("shadow_params")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not isinstance(shadow, (list, tuple)):
        raise CheckpointError("checkpoint['ema'] has no 'shadow_params' list")
    if len(shadow) != len(names):
        raise CheckpointError(
            f"checkpoint['ema']['shadow_params'] has {len(shadow)} tensors; "
            f"this PaiNN has {len(names)} trainable parameters"
        )
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in zip(names, shadow):
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"checkpoint['ema']['shadow_params'] entry for {name!r} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
            )
        out[name] = tensor
    return out


def load_checkpoint(
    path: str | Path,
    *,
    scale_file: str | Path | None = None,
    use_ema: bool | None = None,
    dtype: torch.dtype = torch.float32,
    trusted: bool = False,
) -> PaiNN:
    """Load an OCP/fairchem PaiNN checkpoint as a scatter-free :class:`PaiNN`.

    Args:
        path: the ``.pt`` checkpoint written by an OCP/fairchem trainer.
        scale_file: the separate scale-factor file of older checkpoints
            (else ``config['model']['scale_file']`` is tried beside the checkpoint).
        use_ema: use the EMA weights; ``None`` (default) uses them when present,
            as the upstream trainer that saved them predicts with them.
        dtype: float32 or float64 parameters.
        trusted: allow full unpickling for checkpoints holding Python objects.

    Returns the model in eval mode, with ``model.provenance`` describing the source.
    """
    path = Path(path)
    ckpt = _torch_load(path, trusted)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if ckpt.get("format") == NATIVE_FORMAT:
        return _model_from_native(ckpt, path, dtype)
    for key in ("state_dict", "config"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    config, cfg_scale_file = config_from_ocp(ckpt["config"])
    normalization = _normalization_from_ocp(ckpt)
    model = PaiNN(config, normalization)

    state = _strip_module_prefix(ckpt["state_dict"])
    scales: dict[str, float] = {}
    if scale_file is not None:
        scales = _read_scale_file(Path(scale_file))
    elif any(f"upd_out_scalar_scale_{i}.scale_factor" not in state for i in range(config.num_layers)):
        candidate = Path(cfg_scale_file) if cfg_scale_file else None
        if candidate is not None and not candidate.is_absolute():
            candidate = path.parent / candidate.name
        if candidate is None or not candidate.is_file():
            raise CheckpointError(
                f"{path}: state_dict lacks 'upd_out_scalar_scale_*.scale_factor' and the config's "
                f"scale file {cfg_scale_file!r} was not found; pass scale_file= (CLI: --scale-file)"
            )
        scales = _read_scale_file(candidate)
    _apply_scales(state, scales, config.num_layers, str(scale_file or "scale file"))
    if ckpt.get("scale_dict"):
        _apply_scales(state, ckpt["scale_dict"], config.num_layers, "checkpoint['scale_dict']")

    ema = ckpt.get("ema")
    used_ema = bool(ema) if use_ema is None else use_ema
    if used_ema:
        if not ema:
            raise CheckpointError(f"{path}: use_ema=True but the checkpoint has no 'ema' entry")
        state.update(_ema_weights(model, ema))

    _load_strict(model, state, path)
    for i, scale in enumerate(model.layer_scales()):
        if float(scale.scale_factor) == 0.0:
            log.warning("%s: upd_out_scalar_scale_%d is unfitted (0): used as 1, as upstream does", path, i)
    model.provenance = {
        "source_format": "ocp",
        "source_path": str(path),
        "source_sha256": file_sha256(path),
        "used_ema": used_ema,
        "package_version": _package_version(),
    }
    return model.to(dtype).eval()


def _load_strict(model: PaiNN, state: Mapping[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"{path}: state_dict is missing {sorted(result.missing_keys)}")
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: state_dict has unexpected keys {sorted(result.unexpected_keys)}")


# --------------------------------------------------------------------------
# Native format
# --------------------------------------------------------------------------


def save_model(model: PaiNN, path: str | Path, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (config, normalisation, float32 weights, provenance) to ``path``."""
    path = Path(path)
    merged = dict(getattr(model, "provenance", {}) or {})
    merged.update(provenance or {})
    merged.setdefault("package_version", _package_version())
    payload = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "normalization": dataclasses.asdict(model.normalization),
        "state_dict": {
            k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
            for k, v in model.state_dict().items()
        },
        "provenance": {k: v for k, v in merged.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        torch.save(payload, tmp)
    return path


def _model_from_native(payload: Mapping[str, Any], path: Path, dtype: torch.dtype) -> PaiNN:
    version = payload.get("format_version")
    if version != NATIVE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: native format version {version!r}; this painn-export reads {NATIVE_FORMAT_VERSION}"
        )
    for key in ("config", "normalization", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: native model file has no {key!r} entry")
    try:
        config = PaiNNConfig(**payload["config"])
        norm = dict(payload["normalization"])
        norm["element_references"] = tuple(norm.get("element_references", ()))
        normalization = TargetNormalization(**norm)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config/normalization: {exc}") from exc
    model = PaiNN(config, normalization)
    _load_strict(model, payload["state_dict"], path)
    model.provenance = dict(payload.get("provenance") or {})
    model.provenance.setdefault("source_format", "native")
    model.provenance["source_path"] = str(path)
    model.provenance["source_sha256"] = file_sha256(path)
    return model.to(dtype).eval()


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, **ocp_options: Any) -> PaiNN:
    """Load our native model file or an OCP/fairchem checkpoint (detected from content)."""
    return load_checkpoint(path, dtype=dtype, **ocp_options)
