"""The accuracy prediction of the mixed-precision search (docs/cost-perf.md section 8): a
monotone piecewise-linear fit of the measured budget values against the load (the summed
sensitivities of a point's groups).

A point's budget value (signed so that larger is worse) is assumed to grow with its load; the
fit is the isotonic (non-decreasing, least-squares) regression of the measured values in the
load, by pool-adjacent-violators, joined by straight lines between the pooled knots and
extended past the last knot by the slope of the line through the first and last knots. With
the two ends of the greedy path only it is the line through them (the earlier calibration);
every point measured during the search (the predicted edge, the refinement and back-off
points) adds a knot.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MonotoneFit", "isotonic"]


def isotonic(ys: Sequence[float], ws: Sequence[float] | None = None) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in weighted least squares (weights ``ws``,
    default 1), by pool-adjacent-violators: each pooled block takes its weighted mean."""
    w = [1.0] * len(ys) if ws is None else [float(x) for x in ws]
    if len(w) != len(ys):
        raise ValueError(f"{len(ys)} values but {len(w)} weights")
    blocks: list[list[float]] = []  # [mean, weight, count]
    for y, wi in zip(ys, w):
        blocks.append([float(y), wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for m, _, n in blocks:
        out.extend([m] * int(n))
    return out


@dataclass(frozen=True)
class MonotoneFit:
    """Knots ``loads`` (increasing) and ``values`` (non-decreasing) of the fit; call it with a
    load. Build it with :meth:`of`."""

    loads: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.loads or len(self.loads) != len(self.values):
            raise ValueError("a fit needs at least one knot and as many values as loads")
        if any(b <= a for a, b in zip(self.loads, self.loads[1:])):
            raise ValueError(f"loads={self.loads!r} must increase")
        if any(b < a for a, b in zip(self.values, self.values[1:])):
            raise ValueError(f"values={self.values!r} must not decrease")

    @classmethod
    def of(cls, points: Sequence[tuple[float, float]]) -> MonotoneFit:
        """The fit of measured ``(load, value)`` points (module docstring); points at the same
        load are pooled into their mean."""
        if not points:
            raise ValueError("no measured points to fit")
        for x, y in points:
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"point ({x!r}, {y!r}) is not finite")
        by_load: dict[float, list[float]] = {}
        for x, y in points:
            by_load.setdefault(float(x), []).append(float(y))
        xs = sorted(by_load)
        ys = [sum(by_load[x]) / len(by_load[x]) for x in xs]
        ws = [float(len(by_load[x])) for x in xs]
        return cls(tuple(xs), tuple(isotonic(ys, ws)))

    @property
    def tail_slope(self) -> float:
        """The slope used past the last knot (and before the first): that of the line through
        the first and last knots (0 with one knot)."""
        if len(self.loads) < 2:
            return 0.0
        return (self.values[-1] - self.values[0]) / (self.loads[-1] - self.loads[0])

    def __call__(self, load: float) -> float:
        xs, ys = self.loads, self.values
        if load <= xs[0]:
            return ys[0] + self.tail_slope * (load - xs[0])
        if load >= xs[-1]:
            return ys[-1] + self.tail_slope * (load - xs[-1])
        j = bisect.bisect_right(xs, load)
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        return y0 + (y1 - y0) * (load - x0) / (x1 - x0)
