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
    first = (message.splitlines() or [type(exc).__name__])[0][:300]
    return InferenceError(f"{runtime}: {type(exc).__name__}: {first}")
