"""Figures (PNG) and a standalone HTML page: what ``painn-batch report`` and ``parity --report`` write.

A report is a folder: ``index.html``, one PNG per figure and ``report.json``
with every number the page shows. The page loads nothing from a network:
its style is inline and its images are referenced by file name, so the
folder works wherever it is copied.

matplotlib is imported lazily, and used through its object API on the Agg
canvas: no pyplot, no ``matplotlib.use``, no global state changed behind the
caller's back. Every figure records the texts drawn on it
(:attr:`Figure.texts`), so a test can check that the numbers it carries are
the report's.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Chemical symbols by atomic number (index 0: none).
ELEMENTS = (
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br "
    "Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er "
    "Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md "
    "No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()

DPI = 100
_SIZE = (6.4, 4.8)  # inches: 640 x 480 pixels at DPI


class ReportError(ValueError):
    """A report cannot be made (unusable file, mismatched input, unwritable folder): one line, says why."""


def number(value: float | None, unit: str = "") -> str:
    """How a report writes a number, on its figures and its page alike (4 significant digits)."""
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def element(z: int) -> str:
    return ELEMENTS[z] if 0 < z < len(ELEMENTS) else f"Z={z}"


@dataclass(frozen=True)
class Number:
    """A number shown on a figure and the page: ``label: value unit``."""

    label: str
    value: float | None
    unit: str = ""

    @property
    def text(self) -> str:
        return f"{self.label}: {number(self.value, self.unit)}"

    def as_dict(self) -> dict:
        return {"label": self.label, "value": self.value, "unit": self.unit, "text": self.text}


@dataclass(frozen=True)
class Points:
    """A scatter's points: x and y, each ``[n]``."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Binned:
    """A 2-D histogram: ``counts`` ``[nx, ny]`` over ``x_edges`` ``[nx + 1]`` and ``y_edges`` ``[ny + 1]``."""

    counts: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray


@dataclass(frozen=True)
class Series:
    """One histogram: ``counts`` ``[n]`` over ``edges`` ``[n + 1]``."""

    label: str
    counts: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True)
class Curve:
    """A line ``y(x)``; with ``low`` and ``high`` a band around it."""

    label: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None


@dataclass
class Figure:
    """A figure written to ``file`` in a report folder, and what is on it."""

    file: str
    title: str
    caption: str = ""
    numbers: list[Number] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # every text drawn (titles, labels, annotations)

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "title": self.title,
            "caption": self.caption,
            "numbers": [n.as_dict() for n in self.numbers],
            "texts": self.texts,
        }


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _annotate(ax, numbers: list[Number]) -> None:
    if numbers:
        ax.text(
            0.03,
            0.97,
            "\n".join(n.text for n in numbers),
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
        )


def _save(fig, folder: Path, name: str, title: str, caption: str, numbers: list[Number]) -> Figure:
    from matplotlib.text import Text

    fig.suptitle(title)
    fig.savefig(folder / f"{name}.png", dpi=DPI)
    texts = [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]
    return Figure(f"{name}.png", title, caption, list(numbers), texts)


def parity(
    folder: Path,
    name: str,
    title: str,
    cloud: Points | Binned,
    x_label: str,
    y_label: str,
    numbers: list[Number],
    caption: str = "",
) -> Figure:
    """Predicted against reference, with ``y = x``: every point, or a 2-D histogram (log colour)."""
    from matplotlib.colors import LogNorm

    fig, ax = _new_figure()
    if isinstance(cloud, Points):
        ax.scatter(cloud.x, cloud.y, s=4, alpha=0.6, linewidths=0)
        lo, hi = _span(np.concatenate([cloud.x, cloud.y]))
    else:
        counts = np.where(cloud.counts > 0, cloud.counts, np.nan).T
        mesh = ax.pcolormesh(cloud.x_edges, cloud.y_edges, counts, norm=LogNorm(), cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="count")
        lo, hi = min(cloud.x_edges[0], cloud.y_edges[0]), max(cloud.x_edges[-1], cloud.y_edges[-1])
    ax.plot([lo, hi], [lo, hi], color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    _annotate(ax, numbers)
    return _save(fig, folder, name, title, caption, numbers)


def histogram(
    folder: Path,
    name: str,
    title: str,
    series: list[Series],
    x_label: str,
    numbers: list[Number] = (),
    *,
    log_count: bool = True,
    log_x: bool = False,
    marks: dict[str, float] | None = None,
    caption: str = "",
) -> Figure:
    """Histograms as steps (one per series), counts on a log scale; ``marks``: labelled vertical lines."""
    fig, ax = _new_figure()
    for s in series:
        ax.stairs(
            s.counts, s.edges, label=s.label, fill=len(series) == 1, alpha=0.8 if len(series) == 1 else 1
        )
    for label, x in (marks or {}).items():
        ax.axvline(x, color="crimson", linewidth=1)
        ax.text(x, 0.5, f" {label}", color="crimson", transform=ax.get_xaxis_transform(), fontsize=8)
    if log_count and any(s.counts.any() for s in series):
        from matplotlib.ticker import NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # counts: label the decades only
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("count")
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper right")
    _annotate(ax, list(numbers))
    return _save(fig, folder, name, title, caption, list(numbers))


def bars(
    folder: Path,
    name: str,
    title: str,
    values: list[Number],
    y_label: str,
    caption: str = "",
) -> Figure:
    """One bar per number, its value written above it."""
    fig, ax = _new_figure()
    heights = [0.0 if n.value is None else n.value for n in values]
    drawn = ax.bar([n.label for n in values], heights, color="tab:blue")
    ax.bar_label(drawn, labels=[number(n.value) for n in values], fontsize=7, rotation=90, padding=2)
    ax.set_ylabel(y_label)
    ax.margins(y=0.25)
    if len(values) > 12:
        ax.tick_params(axis="x", labelsize=7, rotation=90)
    return _save(fig, folder, name, title, caption, values)


def lines(
    folder: Path,
    name: str,
    title: str,
    curves: list[Curve],
    x_label: str,
    y_label: str,
    *,
    log_y: bool = False,
    legend: bool = True,
    caption: str = "",
) -> Figure:
    """Curves ``y(x)``, each with its band where it has one."""
    fig, ax = _new_figure()
    for c in curves:
        (line,) = ax.plot(c.x, c.y, label=c.label, linewidth=1)
        if c.low is not None and c.high is not None:
            ax.fill_between(c.x, c.low, c.high, color=line.get_color(), alpha=0.25, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if legend and curves:
        ax.legend(fontsize=7, ncols=2)
    return _save(fig, folder, name, title, caption, [])


def _span(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


class Page:
    """A standalone HTML page, built part by part; every text is escaped."""

    _STYLE = (
        "body{font-family:sans-serif;max-width:1360px;margin:1.5em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;vertical-align:top}th{background:#f2f2f2}pre{background:#f6f6f6;padding:6px;"
        "overflow-x:auto;white-space:pre-wrap;word-break:break-all}figure{display:inline-block;margin:0.5em}"
        "figcaption{font-size:0.9em;max-width:640px}.notice{background:#fff4d6;border:1px solid #e0b000;"
        "padding:0.6em}"
    )

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def notice(self, text: str) -> None:
        self.parts.append(f'<p class="notice">{html.escape(text)}</p>')

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figures(self, figures: list[Figure]) -> None:
        for f in figures:
            alt = html.escape(f.title, quote=True)
            caption = html.escape(f.caption)
            self.parts.append(
                f'<figure><img src="{html.escape(f.file, quote=True)}" alt="{alt}" width="640" height="480">'
                f"<figcaption>{caption}</figcaption></figure>"
            )

    def html(self) -> str:
        title = html.escape(self.title)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{self._STYLE}</style></head><body><h1>{title}</h1>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )


def jsonable(value):
    """``value`` with numpy scalars and arrays as Python ones, and NaN or inf as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_page(folder: Path, page: Page, data: dict) -> Path:
    """``index.html`` and ``report.json`` into ``folder``; returns the page's path."""
    (folder / "report.json").write_text(json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")
    index = folder / "index.html"
    index.write_text(page.html(), encoding="utf-8")
    return index


@contextmanager
def report_folder(target: str | Path) -> Iterator[Path]:
    """A fresh folder to write a report into; it becomes ``target`` when the block ends well.

    An earlier report at ``target`` (a folder with ``report.json``) is
    replaced; any other non-empty folder or file there is refused. On a
    failure nothing is left but what was there before. An OS error (a folder
    that cannot be written) becomes a :class:`ReportError` naming ``target``.
    """
    from painn_export.errors import os_reason
    from painn_export.files import temporary_path

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ReportError(f"cannot write the report folder {target}: it is a file")
    if target.is_dir() and any(target.iterdir()) and not (target / "report.json").is_file():
        raise ReportError(f"{target} exists and holds something other than a report: choose another -o")
    tmp, old = temporary_path(target), temporary_path(target, ".tmp.old")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ReportError(f"cannot write the report folder {target}: {os_reason(exc)}") from exc
    try:
        yield tmp
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)  # the earlier report back in place
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ReportError(f"cannot write the report folder {target}: {os_reason(exc)}") from exc
        raise
