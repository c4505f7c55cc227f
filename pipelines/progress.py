"""A one-line progress bar on stderr: structures/s, atoms/s, ETA. Silent when not on a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool | None = None, stream=None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.atoms = total, 0, 0
        self.start = self.last = time.perf_counter()
        self.interval = interval

    def update(self, structures: int, atoms: int) -> None:
        self.done += structures
        self.atoms += atoms
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        eta_text = f"{int(eta // 60):d}:{int(eta % 60):02d}" if eta != float("inf") else "?"
        self.stream.write(
            f"\r[{bar:<24}] {self.done}/{self.total} structures  {rate:.1f} structures/s  "
            f"{self.atoms / elapsed:.0f} atoms/s  ETA {eta_text} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
