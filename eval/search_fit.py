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

:func:`heldout_bound` is the acceptance value of a measured point: the value the held-out
check (the same budget on other windows of the text) is predicted not to exceed with a stated
confidence, from the point's estimate and 95% interval on the search set (docs/cost-perf.md
section 8, "acceptance").
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["Z95", "Located", "MonotoneFit", "heldout_bound", "isotonic", "locate"]

#: the normal quantile of the two-sided 95% intervals the evaluations report
Z95 = NormalDist().inv_cdf(0.975)


def heldout_bound(estimate: float, bad_end: float, *, search_tokens: int, heldout_tokens: int,
                  confidence: float = 0.95, use: str = "upper") -> float:
    """The budget value a recipe measured on the search set is predicted to stay within on the
    held-out tokens with probability ``confidence`` (values signed so that larger is worse;
    docs/cost-perf.md section 8, "acceptance").

    ``estimate`` and ``bad_end``: the search-set estimate and the bad end of its 95% interval.
    The model: the estimate on ``n`` tokens is normal around the recipe's true value with
    standard error ``sigma_n``; the search set's is ``sigma_s = (bad_end - estimate) / Z95``
    (the interval's bad side), the held-out one's ``sigma_h = sigma_s sqrt(search_tokens /
    heldout_tokens)``; the two sets are disjoint windows, so the held-out estimate differs from
    the search one by a normal error of standard deviation ``sqrt(sigma_s^2 + sigma_h^2)``. The
    held-out check judges the estimate (``use="estimate"``) or the bad end of its interval,
    ``estimate + Z95 sigma_h`` (``"upper"``), so::

        bound = estimate + [use == "upper"] Z95 sigma_h + z(confidence) sqrt(sigma_s^2 + sigma_h^2)

    With ``confidence=0.5`` and equal token counts this is the search set's own bad end (the
    rule that, at the edge of the budget, passes the held-out check about half the time)."""
    for name, v in (("search_tokens", search_tokens), ("heldout_tokens", heldout_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not valid: accepted a positive integer")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or \
            not 0.5 <= confidence < 1:
        raise ValueError(f"confidence={confidence!r} is not valid: accepted a number in "
                         "[0.5, 1)")
    if use not in ("upper", "estimate"):
        raise ValueError(f"use={use!r} is not valid: accepted 'upper', 'estimate'")
    if not (math.isfinite(estimate) and math.isfinite(bad_end)):
        raise ValueError(f"estimate={estimate!r}, bad_end={bad_end!r}: accepted finite numbers")
    sigma_s = max(0.0, bad_end - estimate) / Z95
    sigma_h = sigma_s * math.sqrt(search_tokens / heldout_tokens)
    z = NormalDist().inv_cdf(confidence)
    return estimate + (Z95 * sigma_h if use == "upper" else 0.0) + \
        z * math.hypot(sigma_s, sigma_h)


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


@dataclass(frozen=True)
class Located:
    """What :func:`locate` found: the ``chosen`` index (the cheapest measured point that meets
    the target; else the predicted edge that missed it, for the back-off; 0 when neither end
    helps), the ``values`` measured per index, the value each point was ``predicted`` to have
    just before it was measured (the ends excluded: they start the fit), the points measured
    by refinement (``refined``) and the final ``fit``."""

    chosen: int
    values: dict[int, float]
    predicted: dict[int, float]
    refined: tuple[int, ...]
    fit: MonotoneFit

    @property
    def errors(self) -> dict[int, float]:
        """Measured minus predicted-before-measuring, per predicted point."""
        return {i: self.values[i] - p for i, p in self.predicted.items()}


def locate(loads: Sequence[float], ends: Mapping[int, float], measure: Callable[[int], float],
           target: float, refine: int = 2) -> Located:
    """The cheapest point of a path (index i is cheaper than i - 1; ``loads[i]`` its load)
    whose measured value (larger is worse) is at most ``target``, found by measuring as few
    points as the fit allows (docs/cost-perf.md section 8).

    ``ends``: the measured values of the first and last points; ``measure(i)``: measures one
    more. If the last point meets the target it is chosen; if the first misses, the first.
    Otherwise the cheapest point the fit of the ends predicts to meet (the edge) is measured;
    while the latest chosen point meets the target, the fit is redone on every measured point
    and the cheapest point predicted to meet between it and the first measured point after it
    that misses is measured (at most ``refine`` such rounds)."""
    last = len(loads) - 1
    if set(ends) != {0, last}:
        raise ValueError(f"ends must hold the values of points 0 and {last}, got {sorted(ends)}")
    values = {int(i): float(v) for i, v in ends.items()}
    predicted: dict[int, float] = {}
    refined: list[int] = []

    def fit() -> MonotoneFit:
        return MonotoneFit.of([(loads[i], v) for i, v in values.items()])

    def take(i: int) -> bool:
        predicted[i] = fit()(loads[i])
        values[i] = float(measure(i))
        return values[i] <= target

    def edge(lo: int, hi: int) -> int | None:
        f = fit()
        return max((i for i in range(lo + 1, hi) if f(loads[i]) <= target), default=None)

    if values[last] <= target:
        return Located(last, values, predicted, (), fit())
    if values[0] > target:
        return Located(0, values, predicted, (), fit())
    first = edge(0, last)
    if first is None:
        return Located(0, values, predicted, (), fit())
    if not take(first):
        return Located(first, values, predicted, (), fit())
    lo = first
    while len(refined) < refine:
        hi = min(i for i, v in values.items() if i > lo and v > target)
        nxt = edge(lo, hi)
        if nxt is None:
            break
        refined.append(nxt)
        if take(nxt):
            lo = nxt
    return Located(lo, values, predicted, tuple(refined), fit())
