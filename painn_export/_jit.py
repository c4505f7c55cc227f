"""How the compiled kernels are compiled: numba, nogil, cached on disk where it can be."""

from __future__ import annotations

import numba


def jit(function=None, **options):
    """Compile ``function`` with numba (nogil), cached on disk where numba finds a writable place.

    Without one (a read-only install and no writable user cache directory;
    ``NUMBA_CACHE_DIR`` sets one) numba refuses ``cache=True`` at decoration:
    the kernel is then compiled in each process (~10 s) instead of failing.
    ``options`` go to ``numba.njit`` (``@jit(error_model="numpy")``: a float
    division by zero gives inf or NaN, as numpy's, instead of raising).
    """
    if function is None:
        return lambda f: jit(f, **options)
    try:
        return numba.njit(nogil=True, cache=True, **options)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, **options)(function)
