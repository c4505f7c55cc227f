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
    "bad_alloc",
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def classify_runtime_error(exc: BaseException, runtime: str) -> RuntimeError:
    """``exc`` from a runtime's own call as BatchTooLargeError or InferenceError, with a one-line message."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    text = f"{runtime}: {type(exc).__name__}: {first}"
    if isinstance(exc, MemoryError) or any(p in str(exc).lower() for p in _OUT_OF_MEMORY):
        return BatchTooLargeError(text)
    return InferenceError(text)
