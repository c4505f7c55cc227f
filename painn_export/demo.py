"""The bundled demo model (package data), and the ONNX exports cached for checkpoints.

The demo model is a small PaiNN trained on ASE's EMT potential (see
``painn_export/data/demo.md``, its model card, and ``scripts/train_demo.py``).
It is what ``painn-batch run`` and ``painn-export onnx`` use when no model is
given, so that a fresh install has a real model to run and check.

A checkpoint run on ONNX Runtime is exported once and cached under
``$PAINN_EXPORT_CACHE`` (default ``~/.cache/painn-export``), keyed by the
checkpoint's SHA-256 and the package version.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_FILE = "demo.pt"


def demo_model_path() -> Path:
    """Path of the bundled demo model; works from an installed wheel as from a checkout."""
    from importlib.resources import files

    path = Path(str(files("painn_export") / "data" / DEMO_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled demo model is missing ({path}); reinstall painn-export, or pass a model file"
        )
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PAINN_EXPORT_CACHE", Path.home() / ".cache" / "painn-export"))


def cached_onnx(model, source: str | Path) -> Path:
    """An ONNX Runtime export of ``model`` (loaded from ``source``), made once and reused.

    Gradient-force models are exported with the stress output. The file name
    holds the contract version, so a cache written for another layout is
    never read.
    """
    from painn_export.checkpoint import file_sha256
    from painn_export.contract import CONTRACT_VERSION
    from painn_export.export import export_onnx
    from painn_export.version import __version__

    # load_model records the source file's hash; hash it here only for other callers.
    digest = model.provenance.get("source_sha256") or file_sha256(source)
    digest = digest[:16]
    path = cache_dir() / f"{Path(source).stem}-{digest}-v{__version__}-c{CONTRACT_VERSION}.onnx"
    if not path.is_file():
        _remove_stale_exports(path)
        export_onnx(model, path, stress=model.gradient_forces)
    return path


def _remove_stale_exports(path: Path) -> None:
    """Delete ``PATH.<pid>.tmp`` files left by exports whose process was killed."""
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        try:
            pid = int(tmp.name.removeprefix(path.name + ".").removesuffix(".tmp"))
            os.kill(pid, 0)  # raises when no such process: the export was killed
        except ValueError:
            continue
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            continue  # another user's live process
