"""Plots of evaluation results (matplotlib, Agg, PNG): the accuracy/cost Pareto plot and the
per-layer sensitivity bar chart.

The figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state, no GUI
backend), so they can be drawn from any thread or a headless machine.

    pareto_plot(records, "pareto.png")                  # delta ppl vs bits per element
    sensitivity_plot(layer_records, "sensitivity.png")  # the 20 most sensitive layers
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .tables import MISSING, get_field

__all__ = ["pareto_frontier", "pareto_plot", "sensitivity_plot"]

_DEFAULT_YERR = ("delta_ppl_low", "delta_ppl_high")
_SUFFIXES = (".png", ".svg", ".pdf")


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(records, Mapping) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError("records must be a sequence of mappings (one per point)")
    if not records:
        raise ValueError("records is empty: nothing to plot")


def _column(records: Sequence[Mapping[str, Any]], key: str, *, numeric: bool = True
            ) -> list[Any]:
    """The values of ``key`` in every record; KeyError naming the key if a record lacks it."""
    out = []
    for i, r in enumerate(records):
        v = get_field(r, key)
        if v is MISSING:
            avail = ", ".join(sorted(map(str, r))) or "none"
            raise KeyError(f"column {key!r} is missing from record {i} (its keys: {avail})")
        if numeric:
            try:
                v = float(v) if v is not None else math.nan
            except (TypeError, ValueError):
                raise ValueError(f"column {key!r} of record {i} is {v!r}, not a number") from None
        out.append(v)
    return out


def pareto_frontier(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x and lower y are
    better), sorted by x. Ties on x keep the lowest y; non-finite points are ignored."""
    order = sorted((i for i in range(len(xs)) if math.isfinite(xs[i]) and math.isfinite(ys[i])),
                   key=lambda i: (xs[i], ys[i]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front


def _out_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"cannot write a plot to {str(path)!r}: accepted suffixes "
                         f"{', '.join(_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def pareto_plot(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    x: str = "bits_per_element",
    y: str = "delta_ppl",
    label: str | None = "recipe",
    yerr: tuple[str, str] | None = _DEFAULT_YERR,
    title: str | None = None,
    *,
    logy: bool | str = "auto",
    xlabel: str | None = None,
    ylabel: str | None = None,
    dpi: int = 150,
) -> Path:
    """Scatter of accuracy cost ``y`` against storage cost ``x``, with the Pareto frontier.

    Args:
        records: one mapping per recipe (keys or dotted paths as in
            :func:`precisim.eval.tables.get_field`).
        path: the image file (.png, also .svg / .pdf); its folder is created.
        x, y: the cost and the accuracy-delta columns (lower is better on both).
        label: the column naming each point (None: no labels).
        yerr: ``(low, high)`` columns holding the interval bounds of y, drawn as error bars.
            With the default columns the bars are drawn only when every record has them;
            columns passed explicitly must exist.
        title: the figure title.
        logy: ``"auto"`` uses a log y axis when every y is positive and they span more than a
            decade; True / False force it.

    Returns the path. Raises KeyError naming a missing column, ValueError on no plottable point.
    """
    _check_records(records)
    xs = _column(records, x)
    ys = _column(records, y)
    labels = [str(v) for v in _column(records, label, numeric=False)] if label else None
    bounds = None
    if yerr is not None:
        if len(yerr) != 2 or not all(isinstance(c, str) for c in yerr):
            raise ValueError(f"yerr={yerr!r} is not valid: accepted a (low, high) pair of "
                             "column names or None")
        have = all(get_field(r, c) is not MISSING for r in records for c in yerr)
        if have or yerr != _DEFAULT_YERR:
            bounds = (_column(records, yerr[0]), _column(records, yerr[1]))
    ok = [i for i in range(len(xs)) if math.isfinite(xs[i]) and math.isfinite(ys[i])]
    if not ok:
        raise ValueError(f"no record has finite {x!r} and {y!r} values: nothing to plot")
    out = _out_path(path)
    fig = _figure((6.4, 4.4))
    ax = fig.add_subplot()
    px = [xs[i] for i in ok]
    py = [ys[i] for i in ok]
    if bounds is not None:
        lo = [max(0.0, ys[i] - bounds[0][i]) if math.isfinite(bounds[0][i]) else 0.0 for i in ok]
        hi = [max(0.0, bounds[1][i] - ys[i]) if math.isfinite(bounds[1][i]) else 0.0 for i in ok]
        ax.errorbar(px, py, yerr=[lo, hi], fmt="none", ecolor="0.45", elinewidth=1, capsize=3,
                    zorder=2)
    front = pareto_frontier(xs, ys)
    on_front = set(front)
    ax.scatter(px, py, s=36, zorder=3,
               c=["tab:red" if i in on_front else "tab:blue" for i in ok])
    if len(front) > 1:
        fx = [xs[i] for i in front]
        fy = [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", alpha=0.6, lw=1.5, zorder=1,
                label="Pareto frontier")
        ax.legend(loc="best", fontsize="small")
    if labels is not None:
        span = (max(px) - min(px)) or 1.0
        placed: list[float] = []
        for i in ok:  # stack the labels of points at (nearly) the same x
            near = sum(abs(xs[i] - x0) < 0.04 * span for x0 in placed)
            placed.append(xs[i])
            ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points",
                        xytext=(5, 4) if near % 2 == 0 else (-6, -4 - 11 * (near // 2)),
                        ha="left" if near % 2 == 0 else "right", fontsize="small")
    positive = all(v > 0 for v in py)
    nonzero = [abs(v) for v in py if v != 0]
    wide = bool(nonzero) and max(nonzero) / min(nonzero) > 100
    use_log = (positive and max(py) / min(py) > 10) if logy == "auto" else bool(logy)
    if use_log:
        if not positive:
            raise ValueError(f"logy=True needs positive {y!r} values")
        ax.set_yscale("log")
    elif logy == "auto" and not positive and wide:
        # values of both signs over decades: linear near zero, logarithmic beyond
        ax.set_yscale("symlog", linthresh=max(min(nonzero), max(nonzero) * 1e-3))
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.savefig(out, dpi=dpi)
    return out


def sensitivity_plot(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    x: str = "layer",
    y: str = "delta_ppl",
    top: int | None = 20,
    title: str | None = None,
    *,
    xlabel: str | None = None,
    dpi: int = 150,
) -> Path:
    """Horizontal bar chart of the ``top`` layers with the largest ``y`` (most sensitive on
    top), one bar per record named by its ``x`` column.

    Returns the path. Raises KeyError naming a missing column.
    """
    _check_records(records)
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top={top!r} is not valid: accepted a positive integer or None")
    names = [str(v) for v in _column(records, x, numeric=False)]
    vals = _column(records, y)
    order = sorted((i for i in range(len(vals)) if math.isfinite(vals[i])),
                   key=lambda i: vals[i], reverse=True)
    if not order:
        raise ValueError(f"no record has a finite {y!r} value: nothing to plot")
    if top is not None:
        order = order[:top]
    out = _out_path(path)
    fig = _figure((6.4, max(2.5, 0.6 + 0.28 * len(order))))
    ax = fig.add_subplot()
    pos = list(range(len(order)))[::-1]  # largest at the top
    ax.barh(pos, [vals[i] for i in order],
            color=["tab:red" if vals[i] > 0 else "tab:blue" for i in order])
    ax.set_yticks(pos, [names[i] for i in order], fontsize="small")
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_xlabel(xlabel or y)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or f"{len(order)} most sensitive by {y}")
    fig.savefig(out, dpi=dpi)
    return out
