"""The accuracy prediction of the mixed-precision search (precisim.eval.search_fit,
docs/cost-perf.md section 8), on synthetic accuracy models (a known value of the load).

* pool-adjacent-violators gives the non-decreasing least-squares fit (hand-computed cases,
  and against every monotone step of a brute-force search on small cases);
* the fit passes through monotone measured points, joins them by lines, is the two-end line
  when only the ends are measured, and is non-decreasing whatever the noise;
* on a convex synthetic model (value = load^2: more loss than additive) the fit on the ends
  and the measured midpoint predicts 4 times more closely than the two-end line (h^2/4);
* :func:`locate` finds a cheap point that meets the target: with the ends only it stops at
  the line's (conservative) edge, with refinement rounds it measures the cheaper points the
  refit predicts to meet (hand-computed chords), never more than its rounds allow, stops when
  the refit predicts nothing cheaper, and reports each prediction made before the
  measurement and its error;
* on the tiny checkpoint the search reports its calibration (points, errors = measured -
  predicted-before) and its cache (each (module, format) quantized once in the whole search).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from precisim.eval.search_fit import MonotoneFit, isotonic, locate


def test_isotonic_hand_cases() -> None:
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert isotonic([0.0, 1.0, 2.0]) == [0.0, 1.0, 2.0]
    assert isotonic([2.0, 0.0], [3.0, 1.0]) == [1.5, 1.5]  # weighted mean
    with pytest.raises(ValueError, match="3 values but 2 weights"):
        isotonic([1, 2, 3], [1, 1])


def test_isotonic_is_the_least_squares_monotone_fit() -> None:
    """Exact (Fraction) check: no non-decreasing sequence on a fine grid does better."""
    grid = [Fraction(k, 2) for k in range(-2, 9)]
    for ys in ([3, 1, 2, 0], [1, 4, 2, 3], [2, 2, 1, 4]):
        fit = [Fraction(v).limit_denominator(1000) for v in isotonic([float(y) for y in ys])]
        best = min(sum((a - y) ** 2 for a, y in zip(c, ys))
                   for c in itertools.combinations_with_replacement(grid, len(ys)))
        assert sum((a - y) ** 2 for a, y in zip(fit, ys)) <= best
        assert all(b >= a for a, b in zip(fit, fit[1:]))


def test_fit_interpolates_and_extrapolates() -> None:
    f = MonotoneFit.of([(0.0, 1.0), (4.0, 3.0)])
    assert f(2.0) == 2.0 and f(6.0) == 4.0 and f(-2.0) == 0.0  # the two-end line
    g = MonotoneFit.of([(0.0, 0.0), (1.0, 0.1), (2.0, 1.0), (2.0, 3.0)])
    assert g.loads == (0.0, 1.0, 2.0) and g.values == (0.0, 0.1, 2.0)  # same load pooled
    assert g(1.5) == pytest.approx(1.05) and g(0.5) == pytest.approx(0.05)
    noisy = MonotoneFit.of([(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 3.0)])
    assert noisy.values == (0.0, 1.5, 1.5, 3.0)
    xs = [k / 10 for k in range(-5, 40)]
    assert all(noisy(b) >= noisy(a) for a, b in zip(xs, xs[1:]))
    for bad, what in (([], "no measured points"), ([(0.0, float("nan"))], "not finite")):
        with pytest.raises(ValueError, match=what):
            MonotoneFit.of(bad)
    with pytest.raises(ValueError, match="must increase"):
        MonotoneFit((1.0, 0.0), (0.0, 1.0))


def test_midpoint_knot_predicts_a_convex_model_better() -> None:
    def truth(x: float) -> float:
        return x * x

    grid = [k / 64 for k in range(65)]
    line = MonotoneFit.of([(0.0, truth(0.0)), (1.0, truth(1.0))])
    mid = MonotoneFit.of([(0.0, 0.0), (0.5, truth(0.5)), (1.0, 1.0)])
    err_line = max(abs(line(x) - truth(x)) for x in grid)
    err_mid = max(abs(mid(x) - truth(x)) for x in grid)
    assert err_line == 0.25 and err_mid == 0.0625  # h^2 / 4 with h = 1 and 1/2


def _synthetic(n: int = 41):
    """A path of n points, loads 0..1, whose measured value is load^2 (convex)."""
    loads = [k / (n - 1) for k in range(n)]
    calls: list[int] = []

    def measure(i: int) -> float:
        calls.append(i)
        return loads[i] ** 2

    return loads, measure, calls


def test_locate_refines_towards_the_true_edge() -> None:
    target = 0.36  # true cheapest point: load 0.6 (index 24)
    loads, measure, calls = _synthetic()
    ends = {0: 0.0, 40: 1.0}
    only_line = locate(loads, ends, measure, target, refine=0)
    assert only_line.chosen == 14 and calls == [14]  # the line: load <= 0.36 (index 14.4)
    assert only_line.predicted == {14: pytest.approx(0.35)}
    assert only_line.errors[14] == pytest.approx(0.35 ** 2 - 0.35)
    loads, measure, calls = _synthetic()
    refined = locate(loads, ends, measure, target, refine=3)
    # the refits: chords through (0.35, 0.1225) and (0.525, 0.2756) predict 0.525, then 0.575
    assert calls == [14, 21, 23] and refined.refined == (21, 23) and refined.chosen == 23
    assert all(refined.values[i] == loads[i] ** 2 <= target for i in calls)
    for k, i in enumerate(calls):  # each prediction used only the points measured before it
        f = MonotoneFit.of([(loads[j], loads[j] ** 2) for j in [0, 40, *calls[:k]]])
        assert refined.predicted[i] == pytest.approx(f(loads[i]))
    assert refined.predicted[21] == pytest.approx(0.1225 + 1.35 * 0.175)
    # the true edge is index 24 (0.36); the chord over-predicts a convex model there, so the
    # refit predicts nothing cheaper and the rounds stop, one step short
    loads, measure, calls = _synthetic()
    many = locate(loads, ends, measure, target, refine=20)
    assert calls == [14, 21, 23] and many.chosen == 23
    loads, measure, calls = _synthetic()
    one = locate(loads, ends, measure, target, refine=1)
    assert calls == [14, 21] and one.chosen == 21  # never more rounds than allowed


def test_locate_ends_and_misses() -> None:
    loads, measure, calls = _synthetic(5)
    assert locate(loads, {0: 0.0, 4: 0.5}, measure, 1.0).chosen == 4 and not calls
    assert locate(loads, {0: 2.0, 4: 3.0}, measure, 1.0).chosen == 0 and not calls

    def concave(i: int) -> float:  # worse than the line predicts: the edge misses
        return loads[i] ** 0.5

    r = locate(loads, {0: 0.0, 4: 1.0}, concave, 0.5)
    assert r.chosen == 2 and r.values[2] > 0.5 and not r.refined  # handed to the back-off
    with pytest.raises(ValueError, match="ends must hold the values of points 0 and 4"):
        locate(loads, {0: 0.0}, measure, 1.0)


def test_search_reports_calibration_and_cache(tiny_search) -> None:
    model, r = tiny_search
    measured = [row for row in r.path if row["measured"] is not None]
    predicted = [row for row in measured if row["predicted_before"] is not None]
    c = r.calibration
    assert c["measured_points"] == len(measured) and c["predicted_points"] == len(predicted)
    assert len(predicted) == len(measured) - 2  # every point but the two ends
    assert sorted(row["measured_as"] for row in measured if row["measured_as"] == "end") == \
        ["end", "end"]
    assert {row["measured_as"] for row in measured} <= {"end", "edge", "refine", "backoff"}
    assert all(row["stage"] in ("greedy", "backoff") for row in r.path)
    for row in predicted:  # the fit predicts the acceptance value (docs/cost-perf.md 8)
        assert row["prediction_error"] == pytest.approx(row["accept"] -
                                                        row["predicted_before"])
    for row in measured:  # KL on the estimate, 0.95: the held-out bound exceeds the estimate
        assert row["accept"] >= row["measured"]
    assert c["max_abs_error"] == pytest.approx(max(abs(row["prediction_error"])
                                                   for row in predicted))
    assert "prediction error on the" in r.table() and "quantized-weight cache" in r.table()
    n_mod = sum(1 for n, _ in model.named_modules() if n.endswith("_proj"))
    assert r.cache["max_quantizations"] == 1  # each (module, format) quantized once
    assert r.cache["misses"] == 3 * n_mod and r.cache["hits"] > r.cache["misses"]


def test_search_problem_checks_refine_and_cache_budget() -> None:
    from precisim.eval.search import SearchError, SearchProblem

    for f, bad in (("refine", -1), ("refine", 1.5), ("weight_cache_bytes", -5),
                   ("weight_cache_bytes", True)):
        with pytest.raises(SearchError, match=f"{f}={bad!r} is not valid"):
            SearchProblem(**{f: bad})
    assert SearchProblem(refine=0, weight_cache_bytes=None).refine == 0
