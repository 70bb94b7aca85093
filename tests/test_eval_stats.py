"""precisim.eval.stats: paired bootstrap intervals (coverage, estimates, bad input)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from precisim.eval.stats import Interval, mean_ci, paired_bootstrap, ppl_delta


def _ppl_stat(r: np.ndarray, t: np.ndarray) -> float:
    return math.exp(t.mean()) - math.exp(r.mean())


def test_coverage_of_ppl_delta_iid_simulation():
    """The 95% interval covers the true perplexity delta in about 95% of simulated datasets.

    Generating process: per-token reference NLL ~ Gamma(2, 1.5) (mean 3 nats), the emulated
    model adds a paired perturbation ~ Normal(0.05, 0.3); true delta = e^3.05 - e^3.
    """
    true_delta = math.exp(3.05) - math.exp(3.0)
    rng = np.random.default_rng(12345)
    sims, covered = 200, 0
    for i in range(sims):
        ref = rng.gamma(2.0, 1.5, size=300)
        test = ref + rng.normal(0.05, 0.3, size=300)
        ci = ppl_delta(ref, test, n_resamples=400, seed=i)
        covered += ci.contains(true_delta)
    assert 0.88 <= covered / sims <= 0.99, covered / sims


def test_block_bootstrap_covers_correlated_tokens():
    """With AR(1)-correlated per-token differences (as tokens of a text are), resampling single
    tokens under-covers badly; blocks of a few correlation lengths restore the coverage."""
    rng = np.random.default_rng(7)
    phi, n, sims = 0.9, 2000, 100
    eps = rng.normal(0.0, 0.1, size=(sims, n))
    d = np.empty((sims, n))
    d[:, 0] = eps[:, 0] / math.sqrt(1 - phi**2)  # stationary start
    for j in range(1, n):
        d[:, j] = phi * d[:, j - 1] + eps[:, j]
    ref = rng.gamma(2.0, 1.5, size=(sims, n))
    true_delta = math.exp(3.02) - math.exp(3.0)  # E[ref] = 3, E[test - ref] = 0.02
    cover = {1: 0, 100: 0}
    for i in range(sims):
        for block in cover:
            ci = ppl_delta(ref[i], ref[i] + 0.02 + d[i], n_resamples=300, seed=i, block=block)
            cover[block] += ci.contains(true_delta)
    assert cover[1] / sims < 0.7, cover
    assert 0.8 <= cover[100] / sims <= 1.0, cover


def test_estimate_is_plain_statistic_and_interval_brackets_it():
    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.5, size=500)
    test = ref + rng.normal(0.1, 0.2, size=500)
    ci = ppl_delta(ref, test, n_resamples=200)
    assert ci.estimate == pytest.approx(_ppl_stat(ref, test), rel=1e-12)
    assert ci.low < ci.estimate < ci.high
    assert (ci.level, ci.n) == (0.95, 500)
    rel = ppl_delta(ref, test, relative=True, n_resamples=200)
    assert rel.estimate == pytest.approx(math.exp(test.mean() - ref.mean()) - 1, rel=1e-12)
    m = mean_ci(test, n_resamples=200)
    assert m.estimate == pytest.approx(test.mean(), rel=1e-12)
    g = paired_bootstrap(ref, test, _ppl_stat, n_resamples=200)
    assert g.estimate == pytest.approx(_ppl_stat(ref, test), rel=1e-12)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_fast_mean_path_equals_general_path(block):
    """ppl_delta (resampled means) draws the same resamples as the general paired_bootstrap."""
    rng = np.random.default_rng(3)
    ref = rng.gamma(2.0, 1.5, size=1001)
    test = ref + rng.normal(0.1, 0.2, size=1001)
    fast = ppl_delta(ref, test, n_resamples=300, seed=5, block=block)
    slow = paired_bootstrap(ref, test, _ppl_stat, n_resamples=300, seed=5, block=block)
    vec = paired_bootstrap(ref, test,
                           lambda r, t: np.exp(t.mean(-1)) - np.exp(r.mean(-1)),
                           vectorized=True, n_resamples=300, seed=5, block=block)
    for other in (slow, vec):
        assert fast.low == pytest.approx(other.low, rel=1e-9)
        assert fast.high == pytest.approx(other.high, rel=1e-9)


def test_deterministic_by_seed_and_level_widens():
    rng = np.random.default_rng(1)
    v = rng.normal(size=400)
    assert mean_ci(v, seed=3, n_resamples=300) == mean_ci(v, seed=3, n_resamples=300)
    assert mean_ci(v, seed=3, n_resamples=300) != mean_ci(v, seed=4, n_resamples=300)
    narrow = mean_ci(v, level=0.5, n_resamples=300)
    wide = mean_ci(v, level=0.99, n_resamples=300)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_constant_series_and_top1_agreement():
    ci = mean_ci(np.ones(50), n_resamples=50)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)
    agree = np.array([1.0] * 90 + [0.0] * 10)
    ci = mean_ci(agree, n_resamples=200)
    assert ci.estimate == pytest.approx(0.9)
    assert 0.8 < ci.low < 0.9 < ci.high <= 1.0


def test_large_sample_is_fast():
    """1000 resamples of 100k tokens: one pass of vectorised gathers (about a second on a busy
    2-core machine; much less with blocks)."""
    import time

    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.5, size=100_000)
    test = ref + rng.normal(0.01, 0.1, size=100_000)
    t0 = time.perf_counter()
    ppl_delta(ref, test, block=32)
    assert time.perf_counter() - t0 < 2.0


def test_interval_str_and_dict():
    ci = Interval(1.2341, 1.1, 1.35, 0.95, 10)
    assert str(ci) == "1.234 [1.100, 1.350]"
    assert f"{ci:.1f}" == "1.2 [1.1, 1.4]"
    assert str(Interval(2.0, 2.0, 2.0, 0.95, 3)) == "2 [2, 2]"
    assert ci.to_dict("delta_ppl") == {"delta_ppl": 1.2341, "delta_ppl_low": 1.1,
                                       "delta_ppl_high": 1.35}


@pytest.mark.parametrize(
    ("ref", "test", "match"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([], [], "empty"),
        ([1.0, float("nan")], [1.0, 2.0], "ref holds 1 non-finite"),
        ([1.0, 2.0], [1.0, float("inf")], "test holds 1 non-finite.*index 1"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        (["a", "b"], [1.0, 2.0], "ref must be a 1-D array of numbers"),
    ],
)
def test_bad_input(ref, test, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(ref, test, _ppl_stat)
    with pytest.raises(ValueError):
        ppl_delta(ref, test)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_resamples": 0}, "n_resamples=0"),
        ({"level": 1.5}, "level=1.5"),
        ({"block": 0}, "block=0"),
        ({"block": 11}, r"block=11 .* 1\.\.10"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        mean_ci(np.arange(10.0), **kw)


def test_nonfinite_statistic_and_bad_vectorised_shape():
    with pytest.raises(ValueError, match="full sample"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], lambda r, t: float("nan"))
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], lambda r, t: t - r, vectorized=True)
    with pytest.raises(ValueError, match="callable"):
        paired_bootstrap([1.0], [1.0], "mean")  # type: ignore[arg-type]
