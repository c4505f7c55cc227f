"""Errors shared across floors (no imports): what a user can act on."""


class RuntimeUnavailableError(RuntimeError):
    """The runtime's library or device is missing; the message says what to install."""


class BatchTooLargeError(RuntimeError):
    """The runtime could not fit this batch (memory, engine profile): a smaller batch may work."""


class InferenceError(RuntimeError):
    """The runtime failed on a batch for a reason a smaller batch would not fix."""


# Phrases by which runtimes report memory exhaustion in their own exception types.
_OUT_OF_MEMORY = (
    "failed to allocate",
    "is smaller than requested bytes",  # onnxruntime's arena at its limit
    "bad_alloc",
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def classify_runtime_error(exc: BaseException, runtime: str) -> RuntimeError:
    """``exc`` from a runtime's own call as BatchTooLargeError or InferenceError, with a one-line message."""
    message = str(exc).strip()
    lowered = message.lower()
    hits = [lowered.find(p) for p in _OUT_OF_MEMORY if p in lowered]
    if isinstance(exc, MemoryError) or hits:
        # The runtime's own words about the allocation, not its preamble (node names, source paths).
        start = max(lowered.rfind(" ", 0, max(0, min(hits) - 40)) + 1, 0) if hits else 0
        detail = message[start:].splitlines()[0][:90] if message else type(exc).__name__
        return BatchTooLargeError(f"{runtime}: out of memory ({detail})")
    return InferenceError(f"{runtime}: {type(exc).__name__}: {one_line(exc)}")


# Where a message turns into a stack dump (C++ runtimes, Python tracebacks): nothing after it is for a user.
_DUMP_MARKERS = ("Exception raised from ", "(most recent call first)", "Traceback (most recent call last)")
# HDF5's report of a failed system call, inside its message: "..., errno = 28, error message = '...', ...".
_HDF5_SYSCALL = ("error message = '", "filename = '", "name = '")


def _quoted_after(text: str, key: str) -> str | None:
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    end = text.find("'", start)
    return text[start:end] if end > 0 else None


def os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed file operation ("No space left on device"), HDF5's too."""
    text = " ".join(str(exc).split())
    return _quoted_after(text, _HDF5_SYSCALL[0]) or getattr(exc, "strerror", None) or one_line(exc)


def one_line(exc: BaseException | str, limit: int | None = 300) -> str:
    """A runtime's, HDF5's or the OS's error message on one line, keeping its cause.

    Lines are joined (HDF5 puts a newline inside its own messages, after a
    timestamp), a stack dump is dropped, and a failed system call that HDF5
    reports (its own OSError or RuntimeError) is reduced to what it did, the
    operating system's words and the file: "Can't synchronously write data:
    No space left on device (/data/out.partial.h5.creating)". A message longer than ``limit`` keeps
    its whole first sentences, never part of one (``None``: the whole message,
    for the project's own messages, whose advice comes last).
    """
    text = str(exc)
    for marker in _DUMP_MARKERS:
        text = text.split(marker, 1)[0]
    text = " ".join(text.split())
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    # HDF5's own errors only (h5py raises OSError, RuntimeError), not a message of ours quoting one.
    cause = _quoted_after(text, _HDF5_SYSCALL[0]) if isinstance(exc, (OSError, RuntimeError)) else None
    if cause:
        head = text.split(" (", 1)[0]
        if head.startswith("[Errno"):
            head = head.split("] ", 1)[-1]
        path = _quoted_after(text, _HDF5_SYSCALL[1]) or _quoted_after(text, _HDF5_SYSCALL[2])
        text = f"{head}: {cause}" + (f" ({path})" if path else "")
    if limit is None or len(text) <= limit:
        return text
    # Whole sentences up to the limit; a first sentence longer than that is kept whole up to twice it.
    ends = [i + 1 for i, ch in enumerate(text[: 2 * limit]) if ch in ".;!?" and text[i + 1 : i + 2] == " "]
    fits = [i for i in ends if i <= limit] or ends[:1]
    if fits:
        return text[: fits[-1]] + " [...]"
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit] + " [...]"
