"""What a cluster user meets: scheduler signals, a full disk, an ASCII locale, a home that cannot be written.

Each case runs the real CLI in a subprocess under the real condition: the
signal sent to it mid-run, a file-size limit (``RLIMIT_FSIZE``: a write past
it fails with EFBIG, as one on a full disk fails with ENOSPC), ``LC_ALL=C``
without Python's UTF-8 mode, ``HOME`` where no folder can be made.
"""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_pipeline import _assert_gone, _done, _interrupt_when, _many, _read

from painn_export import save_model
from painn_export.errors import one_line
from painn_export.schema import write_input
from pipelines.cli import main

from checks import assert_close
from conftest import SMALL, make_model

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from pipelines.cli import main; sys.exit(main())"


def _batch(args, env=None, fsize: int | None = None, **kw) -> subprocess.Popen:
    """``painn-batch ARGS`` in a new process.

    ``env`` adds to this one's environment (None: unset); ``fsize`` is the largest file it may write.
    """

    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}.items() if v is not None}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *map(str, args)],
        env=env,
        cwd=ROOT,
        preexec_fn=limit,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode("utf-8", "replace")


def _one_line(stderr: str, *words) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for word in words:
        assert str(word) in lines[0], stderr


def _debris(folder: Path) -> list[str]:
    """Temporary files and locks left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".creating", ".writing", ".lock", ".tmp"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(make_model(SMALL, torch.float32), tmp_path_factory.mktemp("model") / "m.pt")


def test_sigterm_and_sighup_keep_the_work_and_resume_exactly(tmp_path, model):
    n = 240
    inp = write_input(tmp_path / "in.h5", _many(n, seed=3))
    base = ["run", inp, "--model", model, "--runtime", "torch", "--max-atoms", "160", "-q"]
    ref = tmp_path / "ref.h5"
    result = CliRunner().invoke(main, [*map(str, base), "-o", str(ref), "--workers", "0"])
    assert result.exit_code == 0, result.output
    out, partial = tmp_path / "out.h5", tmp_path / "out.partial.h5"
    run = [*base, "-o", out, "--workers", "2"]
    for sig, resume in ((signal.SIGTERM, []), (signal.SIGHUP, ["--resume"])):
        proc = _batch([*run, *resume])
        assert _interrupt_when(proc, partial, _done(partial) + 24, sig), "the run ended before the signal"
        code, err = _finish(proc, timeout=60)
        # The shell's convention, and one line saying what happened and how to go on.
        assert code == 128 + sig, (code, err)
        _one_line(err, sig.name, "--resume", partial)
        _assert_gone(proc.workers_seen, timeout=10)  # the neighbour workers stopped with the run
        assert partial.exists() and not out.exists() and _debris(tmp_path) == []
    done = _done(partial)
    proc = _batch([*run, "--resume", "--json"])
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["already_done"] == done and summary["computed"] == n - done
    got, want = _read(out), _read(ref)
    np.testing.assert_array_equal(got["status"], want["status"])
    assert_close("energy", got["energy"], want["energy"], "other_batch", "float32")


@pytest.fixture(scope="module")
def computed(tmp_path_factory, model):
    """An input whose ids are not ASCII, and its result."""
    tmp = tmp_path_factory.mktemp("computed")
    rows = _many(12, seed=5)
    inp = write_input(tmp / "in.h5", rows, ids=[f"Å-{k}-é" for k in range(len(rows))])
    res = tmp / "res.h5"
    args = ["run", inp, "--model", model, "--runtime", "torch", "-o", res, "--workers", "0", "-q"]
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0
    return inp, res


def test_a_full_disk_while_the_output_is_created_leaves_nothing(tmp_path, model, computed):
    inp, _ = computed
    out = tmp_path / "new" / "folders" / "out.h5"  # made by the run, and gone with it
    args = ["run", inp, "--model", model, "--runtime", "torch", "-o", out, "--workers", "0"]
    code, err = _finish(_batch(args, fsize=4096))  # the lock file fits, the output does not
    assert code == 1
    _one_line(err, "File too large", "out.partial.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out = tmp_path / "out.h5"
    args = ["run", inp, "--model", model, "--runtime", "torch", "-o", out, "--workers", "0"]
    code, err = _finish(_batch(args, fsize=0))  # not a byte: the lock file's pid does not fit either
    assert code == 1
    _one_line(err, "File too large", "out.h5.lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_results_are_written_without_growing_the_output(tmp_path, model, computed):
    """Once created, the output only has its preallocated bytes rewritten: a disk full then loses nothing."""
    from pipelines.output import Fingerprint, create

    inp, res = computed
    out, partial = tmp_path / "out.h5", tmp_path / "out.partial.h5"
    with h5py.File(res) as fh:  # the fingerprint of a run of this input and model
        stored = {
            k.removeprefix("fingerprint_"): v for k, v in fh.attrs.items() if k.startswith("fingerprint_")
        }
    create(partial, Fingerprint(**{k: v.item() if hasattr(v, "item") else v for k, v in stored.items()}))
    args = ["run", inp, "--model", model, "--runtime", "torch", "-o", out, "--workers", "0", "--resume"]
    code, err = _finish(_batch(args, fsize=partial.stat().st_size))  # not a byte more than it has
    assert code == 0, err
    assert out.exists() and _debris(tmp_path) == []
    np.testing.assert_array_equal(_read(out)["energy"], _read(res)["energy"])


def test_a_full_disk_in_export_leaves_nothing(tmp_path, computed):
    inp, res = computed
    xyz = tmp_path / "res.extxyz"
    code, err = _finish(_batch(["export", res, "--input", inp, "-o", xyz], fsize=2048))
    assert code == 1
    _one_line(err, "File too large", xyz)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_in_convert_leaves_nothing(tmp_path, computed):
    """convert writes its schema file through SchemaWriter: a full disk is one line, no .writing left."""
    pytest.importorskip("ase")
    from ase.build import bulk
    from ase.io import write

    src = tmp_path / "src" / "many.extxyz"
    src.parent.mkdir()
    frames = []
    for k in range(40):
        atoms = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
        atoms.rattle(0.05, seed=k)
        frames.append(atoms)
    write(src, frames)
    out = tmp_path / "out" / "conv.h5"
    out.parent.mkdir()
    code, err = _finish(_batch(["convert", src, "-o", out], fsize=4096))
    assert code == 1
    _one_line(err, "File too large", out.name)
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_export_writes_utf8_whatever_the_locale(tmp_path, computed):
    inp, res = computed
    xyz = tmp_path / "res.extxyz"
    ascii_only = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    code, err = _finish(_batch(["export", res, "--input", inp, "-o", xyz], env=ascii_only))
    assert code == 0, err
    text = xyz.read_text(encoding="utf-8")
    assert "Å-0-é" in text and "Å-11-é" in text
    assert _debris(tmp_path) == []


def test_onnx_cache_without_a_writable_home_falls_back_and_says_so(tmp_path, model, computed):
    inp, _ = computed
    (tmp_path / "home").write_text("a file: no folder can be made under it, not even by root")
    env = {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    env |= {"PAINN_EXPORT_CACHE": None, "XDG_CACHE_HOME": None}
    (tmp_path / "tmp").mkdir()
    args = ["run", inp, "--model", model, "--runtime", "onnxruntime", "-o", tmp_path / "o.h5", "-q"]
    code, err = _finish(_batch([*args, "--workers", "0"], env=env))
    assert code == 0, err
    # One notice (ONNX Runtime may add its own warning, that it cannot keep its telemetry id there).
    notices = [line for line in err.splitlines() if "PAINN_EXPORT_CACHE" in line]
    assert len(notices) == 1 and "Traceback" not in err, err
    _one_line(notices[0], tmp_path / "home", "Not a directory", "painn-export-")
    fallback = tmp_path / "tmp" / f"painn-export-{os.getuid()}"
    assert [p.suffix for p in fallback.iterdir()] == [".onnx"]
    assert fallback.stat().st_mode & 0o077 == 0  # this user's own


def test_an_unwritable_cache_chosen_by_the_user_is_one_line(tmp_path, model, computed):
    inp, _ = computed
    (tmp_path / "afile").write_text("x")
    env = {"PAINN_EXPORT_CACHE": str(tmp_path / "afile" / "cache")}
    args = ["run", inp, "--model", model, "-o", tmp_path / "o.h5", "--workers", "0", "-q"]
    code, err = _finish(_batch(args, env=env))
    assert code == 1
    _one_line(err, "PAINN_EXPORT_CACHE", "afile", "Not a directory")


def test_one_line_keeps_the_cause():
    hdf5 = OSError(
        "Can't synchronously write data (file write failed: time = Mon Nov 30 18:00:00 2026\n"
        ", filename = '/data/out.partial.h5.creating', file descriptor = 5, errno = 28, "
        "error message = 'No space left on device', buf = 0x55, total write size = 8388608, offset = 0)"
    )
    assert one_line(hdf5) == (
        "Can't synchronously write data: No space left on device (/data/out.partial.h5.creating)"
    )
    torch_like = RuntimeError(
        "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1.\n"
        "Exception raised from infer_size_impl at ExpandUtils.cpp:31 (most recent call first):\n"
        "frame #0: c10::Error::Error(...) + 0x96"
    )
    assert one_line(torch_like) == (
        "The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1."
    )
    ours = ValueError(f"out.partial.h5: unreadable ({hdf5}); delete it to start over")
    assert one_line(ours, limit=None).endswith("delete it to start over")  # the advice stays
    long = "First sentence of the cause. " + "Then details. " * 40
    assert one_line(long, limit=60) == "First sentence of the cause. Then details. Then details. [...]"


def test_a_stop_signal_whose_exception_python_swallowed_still_stops_the_loop():
    """A signal whose handler runs inside a weakref callback: Python prints "Exception ignored"
    and goes on. The pipeline loop's next safe point raises it again (seen in a run: a Ctrl-C
    during garbage collection let the run finish with exit 0)."""
    import gc
    import weakref

    from pipelines.batches import Limits, Summary, evaluate
    from pipelines.graphs import Item
    from pipelines.progress import Progress
    from pipelines.signals import Stopped, stop_on_signals

    class Thing:
        pass

    seen = []

    def items():
        for k in range(5):
            seen.append(k)
            if k == 1:  # the handler runs inside the callback, and its Stopped is ignored there
                thing = Thing()
                ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGTERM))
                del thing
                gc.collect()
                assert ref() is None
            yield Item(k, None, "invalid_structure", "no graph")

    class Sink:
        def commit_results(self, rows):
            pass

        def commit_status(self, rows):
            pass

    with stop_on_signals(), pytest.raises(Stopped) as caught:
        evaluate(items(), None, Sink(), Limits(10, 1e9, 1e9), Summary(), Progress(0, enabled=False))
    assert caught.value.signum == signal.SIGTERM and seen == [0, 1]


def test_at_safe_points_a_first_signal_waits_and_a_second_stops_at_once():
    """relax's loop: the first SIGTERM only stops at the next safe point (a last checkpoint is then
    written, safe=True); a second one stops at once (safe=False: no checkpoint of a half step)."""
    from pipelines.signals import Stopped, check_stop, stop_at_safe_points, stop_on_signals

    with stop_on_signals(), stop_at_safe_points():
        signal.raise_signal(signal.SIGTERM)  # deferred: nothing raised here
        with pytest.raises(Stopped) as first:
            check_stop()
        assert first.value.safe and first.value.signum == signal.SIGTERM
    with stop_on_signals(), stop_at_safe_points():
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(Stopped) as second:
            signal.raise_signal(signal.SIGINT)
        assert not second.value.safe
    with stop_on_signals(), pytest.raises(Stopped) as plain:  # outside safe points: at once, as before
        signal.raise_signal(signal.SIGHUP)
    assert plain.value.signum == signal.SIGHUP
