"""The bundled demo model (package data), and the ONNX exports cached for checkpoints.

The demo model is a small PaiNN trained on ASE's EMT potential (see
``painn_export/data/demo.md``, its model card, and ``scripts/train_demo.py``).
It is what ``painn-batch run`` and ``painn-export onnx`` use when no model is
given, so that a fresh install has a real model to run and check.

A checkpoint run on ONNX Runtime is exported once and cached under
``$PAINN_EXPORT_CACHE`` (default ``$XDG_CACHE_HOME/painn-export``, that is
``~/.cache/painn-export``), keyed by the checkpoint's SHA-256 and the package
version. Without a writable home (a container, a shared account) the default
falls back to a per-user temporary folder, and says so once on stderr.
"""

from __future__ import annotations

import os
import sys
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
    """A folder this process can write ONNX exports to (created if needed).

    ``$PAINN_EXPORT_CACHE`` when set (an unwritable one is an error: the user
    chose it); else the user's cache folder; else, when that cannot be
    written (read-only or missing home), ``painn-export-<uid>`` in the
    temporary folder, said once on stderr. Raises PermissionError, naming the
    folder and ``PAINN_EXPORT_CACHE``, when there is no folder to write.
    """
    chosen = os.environ.get("PAINN_EXPORT_CACHE")
    if chosen:
        reason = _unwritable(Path(chosen))
        if reason:
            raise PermissionError(
                f"cannot write the cache folder PAINN_EXPORT_CACHE={chosen} ({reason}): "
                "set PAINN_EXPORT_CACHE to a folder you can write"
            )
        return Path(chosen)
    try:
        default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "painn-export"
    except RuntimeError:  # no HOME and no passwd entry (a container's random user)
        default, reason = Path("~/.cache/painn-export"), "no home folder"
    else:
        reason = _unwritable(default)
        if reason is None:
            return default
    import tempfile

    fallback = Path(tempfile.gettempdir()) / f"painn-export-{os.getuid()}"
    problem = _unwritable(fallback, private=True)
    if problem:
        raise PermissionError(
            f"cannot write the cache folder {default} ({reason}), nor {fallback} ({problem}): "
            "set PAINN_EXPORT_CACHE to a folder you can write"
        )
    if fallback not in _told:
        _told.add(fallback)
        print(
            f"painn-export: cannot write the cache folder {default} ({reason}); caching ONNX exports in "
            f"{fallback} instead (set PAINN_EXPORT_CACHE to choose)",
            file=sys.stderr,
        )
    return fallback


_told: set[Path] = set()  # fallback folders already announced in this process


def _unwritable(folder: Path, private: bool = False) -> str | None:
    """Why files cannot be written in ``folder`` (made if needed), or None.

    A real write, not permission bits (root, read-only mounts). ``private``:
    the folder must be this user's own and closed to others (a shared
    temporary folder, where someone else could have made it first).
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        if private:
            import stat

            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return "not a folder of this user's own"
            os.chmod(folder, 0o700)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _dtype_tag(dtype: str) -> str:
    return "" if dtype == "float32" else f"-{dtype}"  # float32 caches keep their names


def cached_onnx(model, source: str | Path, dtype: str = "float32") -> Path:
    """An ONNX Runtime export of ``model`` (loaded from ``source``) in ``dtype``, made once and reused."""
    return _cached(model, source, f"{_dtype_tag(dtype)}.onnx", dtype=dtype)


def cached_aoti(model, source: str | Path, device: str = "cpu", dtype: str = "float32") -> Path:
    """An AOTInductor package of ``model`` for ``device`` (cpu, cuda), compiled once and reused.

    The name holds the torch version and the device (and the GPU's compute
    capability): a package runs only where it was compiled.
    """
    import torch

    from painn_export.aoti import device_tag

    tag = f"torch{torch.__version__}-{device_tag(device)}{_dtype_tag(dtype)}"
    return _cached(model, source, f"-{tag}.pt2", device, dtype)


def _cached(model, source: str | Path, suffix: str, device: str = "cpu", dtype: str = "float32") -> Path:
    """An export of ``model`` named by its source's hash, the package and contract versions, and ``suffix``.

    Gradient-force models are exported with the stress output. A cache
    written for another layout (contract version) is never read.
    """
    import torch

    from painn_export.contract import CONTRACT_VERSION
    from painn_export.files import file_sha256, remove_stale_temporaries
    from painn_export.version import __version__

    # load_model records the source file's hash; hash it here only for other callers.
    digest = model.provenance.get("source_sha256") or file_sha256(source)
    digest = digest[:16]
    path = cache_dir() / f"{Path(source).stem}-{digest}-v{__version__}-c{CONTRACT_VERSION}{suffix}"
    if not path.is_file():
        remove_stale_temporaries(path)  # this host's, left by killed exports
        if suffix.endswith(".pt2"):
            from painn_export.aoti import export_aoti

            export_aoti(model, path, device=device, stress=model.gradient_forces, dtype=getattr(torch, dtype))
        else:
            from painn_export.export import export_onnx

            export_onnx(model, path, stress=model.gradient_forces, dtype=getattr(torch, dtype))
    return path
