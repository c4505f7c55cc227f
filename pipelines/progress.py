"""The run's progress bar (tqdm) on stderr: structures, structures/s, atoms/s, ETA. Silent off a terminal."""

from __future__ import annotations

import sys

# "{rate_fmt}" is structures/s; the postfix carries atoms/s.
BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} structures [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Progress:
    """A tqdm bar counting structures, with the atoms/s rate beside it."""

    def __init__(
        self, total: int, enabled: bool | None = None, stream=None, interval: float = 0.5, label: str = ""
    ) -> None:
        """``label`` leads the line: what runs, and where (``onnxruntime-cpu on cpu``)."""
        from tqdm import tqdm

        stream = stream or sys.stderr
        self.enabled = stream.isatty() if enabled is None else enabled
        self.atoms = 0
        self.bar = tqdm(
            total=total,
            unit=" structures",
            file=stream,
            disable=not self.enabled,
            mininterval=interval,
            dynamic_ncols=True,
            bar_format=BAR,
            desc=label or None,
        )

    def update(self, structures: int, atoms: int) -> None:
        self.atoms += atoms
        if self.enabled:
            elapsed = self.bar.format_dict["elapsed"] or 1e-9
            self.bar.set_postfix_str(f"{self.atoms / elapsed:.0f} atoms/s", refresh=False)
        self.bar.update(structures)

    def close(self) -> None:
        self.bar.close()
