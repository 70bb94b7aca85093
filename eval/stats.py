"""Paired bootstrap confidence intervals for accuracy deltas (perplexity, KL, top-1).

An emulated model and its reference are evaluated on the *same* tokens, so the per-token values
(negative log-likelihoods, KL divergences, top-1 agreements) are paired: the bootstrap resamples
token positions jointly for both series, which cancels the variance the two share (a hard
sentence is hard for both models) and gives much tighter intervals on the delta than two
independent intervals would.

Tokens of one text are correlated, so resampling single tokens understates the variance. With
``block > 1`` the resample is built from contiguous runs of ``block`` positions (the circular
moving-block bootstrap of Politis & Romano, 1992: runs may wrap around the end, which gives
every position the same weight). The interval is the percentile interval of the resampled
statistic.

    from precisim.eval.stats import ppl_delta, mean_ci, paired_bootstrap
    ci = ppl_delta(ref_nll, test_nll, block=64)     # Interval: exp(mean test) - exp(mean ref)
    print(ci)                                        # "0.4123 [0.3561, 0.4702]"
    kl = mean_ci(kl_per_token)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "mean_ci", "paired_bootstrap", "ppl_delta"]

#: elements gathered per chunk of resamples (bounds the memory of the vectorised bootstrap)
CHUNK_ELEMENTS = 1 << 20

Statistic = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval [low, high] at ``level``."""

    estimate: float
    low: float
    high: float
    level: float
    n: int  #: number of paired units (tokens) the estimate is computed from

    def __str__(self) -> str:
        """``"1.234 [1.100, 1.350]"``: decimals chosen from the interval's width."""
        width = self.high - self.low
        if not math.isfinite(width) or width <= 0:
            return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"
        decimals = min(12, max(0, 2 - math.floor(math.log10(width))))
        return f"{self.estimate:.{decimals}f} [{self.low:.{decimals}f}, {self.high:.{decimals}f}]"

    def __format__(self, spec: str) -> str:
        """``f"{ci:.3f}"`` formats the estimate and both bounds with the same spec."""
        if not spec:
            return str(self)
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high``."""
        return self.low <= value <= self.high

    def to_dict(self, name: str) -> dict[str, float]:
        """``{name: estimate, name_low: low, name_high: high}``, for flat result records."""
        return {name: self.estimate, f"{name}_low": self.low, f"{name}_high": self.high}


def _as_series(values: object, what: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 array, or ValueError naming the problem."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a 1-D array of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one value per token), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: at least one value is needed")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} holds {int(bad.sum())} non-finite value(s) (NaN or inf); the "
                         f"first at index {i} is {arr[i]}")
    return arr


def _check_options(n: int, n_resamples: int, level: float, block: int) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} is not valid: accepted an integer >= 1")
    if not isinstance(level, float | int) or not 0 < level < 1:
        raise ValueError(f"level={level!r} is not valid: accepted a number in (0, 1), e.g. 0.95")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= n:
        raise ValueError(f"block={block!r} is not valid: accepted an integer in 1..{n} (the "
                         "number of paired values)")


def _resample_indices(rng: np.random.Generator, n: int, block: int, m: int) -> np.ndarray:
    """(m, n) positions of m circular moving-block resamples of n units."""
    if block == 1:
        # uint32 draws are the cheapest; take() is fastest with native intp indices
        return rng.integers(0, n, size=(m, n), dtype=np.uint32).astype(np.intp)
    nb = -(-n // block)
    starts = rng.integers(0, n, size=(m, nb, 1))
    idx = (starts + np.arange(block)) % n
    return idx.reshape(m, nb * block)[:, :n]


def _means_sampler(series: tuple[np.ndarray, ...], block: int
                   ) -> Callable[[np.random.Generator, int], list[np.ndarray]]:
    """A function drawing the means of m resamples of each series (the same positions for all).

    It consumes the same random numbers as :func:`_resample_indices`, so its resamples are those
    of the general path; for ``block > 1`` the sum of a resample is assembled from precomputed
    circular run sums (O(n / block) per resample instead of O(n)).
    """
    n = series[0].size
    if block == 1:
        stacked = np.stack(series)

        def draw1(rng: np.random.Generator, m: int) -> list[np.ndarray]:
            sums = np.take(stacked, _resample_indices(rng, n, 1, m), axis=1).mean(axis=-1)
            return list(sums)

        return draw1
    nb = -(-n // block)
    rem = n - (nb - 1) * block  # length of the last, truncated run
    runs = []
    for s in series:
        cs = np.concatenate(([0.0], np.cumsum(np.concatenate((s, s[:block])))))
        runs.append((cs[block:block + n] - cs[:n], cs[rem:rem + n] - cs[:n]))

    def draw(rng: np.random.Generator, m: int) -> list[np.ndarray]:
        starts = rng.integers(0, n, size=(m, nb, 1))[:, :, 0]
        return [(run[starts[:, :-1]].sum(axis=-1) + last[starts[:, -1]]) / n
                for run, last in runs]

    return draw


def _bootstrap(series: tuple[np.ndarray, ...], estimate: float,
               resampled: Callable[..., np.ndarray], *, n_resamples: int, level: float,
               seed: int | None, block: int, means: bool = False) -> Interval:
    """The percentile interval of ``resampled(*per_series) -> (m,)`` over the resamples.

    ``per_series`` are the resampled arrays (m, n), or with ``means=True`` their means (m,).
    """
    n = series[0].size
    _check_options(n, n_resamples, level, block)
    if not math.isfinite(estimate):
        raise ValueError(f"the statistic of the full sample is {estimate}; it must be finite")
    rng = np.random.default_rng(seed)
    draw_means = _means_sampler(series, block) if means else None
    stats = np.empty(n_resamples, dtype=np.float64)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, rows):
        m = min(rows, n_resamples - start)
        if draw_means is not None:
            args = draw_means(rng, m)
        else:
            idx = _resample_indices(rng, n, block, m)
            args = [np.take(s, idx) for s in series]
        out = np.asarray(resampled(*args), dtype=np.float64)
        if out.shape != (m,):
            raise ValueError(f"the vectorised statistic returned shape {out.shape} for {m} "
                             f"resamples; expected ({m},) (reduce over the last axis)")
        stats[start:start + m] = out
    bad = ~np.isfinite(stats)
    if bad.any():
        raise ValueError(f"the statistic is not finite on {int(bad.sum())} of {n_resamples} "
                         "bootstrap resamples")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(estimate), float(low), float(high), float(level), n)


def paired_bootstrap(
    ref: object,
    test: object,
    statistic: Statistic,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
    block: int = 1,
    vectorized: bool = False,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(ref, test)`` over paired units.

    Args:
        ref, test: 1-D arrays of per-unit values (e.g. per-token NLL of the reference and of
            the emulated model) of the same length; position i of both is the same unit.
        statistic: ``statistic(ref_sample, test_sample) -> float``, e.g.
            ``lambda r, t: np.exp(t.mean()) - np.exp(r.mean())`` for a perplexity delta.
            With ``vectorized=True`` it receives 2-D arrays (resamples x units) and must return
            one value per row (reduce over ``axis=-1``): much faster for large samples.
        n_resamples: number of bootstrap resamples.
        level: coverage of the two-sided interval (0.95: the 2.5% and 97.5% percentiles).
        seed: seed of the numpy Generator drawing the resamples (same seed, same interval).
        block: length of the contiguous runs resampled together (1: the ordinary bootstrap;
            use tens to hundreds of tokens for text, whose tokens are correlated).

    Returns:
        An :class:`Interval` whose estimate is the statistic of the full (not resampled) data.

    Raises:
        ValueError: lengths differ, an input is empty / not 1-D / holds NaN or inf, or an
            option is out of range.
    """
    r = _as_series(ref, "ref")
    t = _as_series(test, "test")
    if r.size != t.size:
        raise ValueError(f"ref has {r.size} values and test has {t.size}; paired samples must "
                         "have the same length")
    if not callable(statistic):
        raise ValueError(f"statistic must be callable (ref_sample, test_sample) -> float, got "
                         f"{type(statistic).__name__}")
    if vectorized:
        estimate = float(np.asarray(statistic(r[None, :], t[None, :])).reshape(-1)[0])
        resampled = statistic
    else:
        estimate = float(statistic(r, t))

        def resampled(rs: np.ndarray, ts: np.ndarray) -> np.ndarray:
            return np.array([statistic(a, b) for a, b in zip(rs, ts)], dtype=np.float64)

    return _bootstrap((r, t), estimate, resampled, n_resamples=n_resamples, level=level,
                      seed=seed, block=block)


def ppl_delta(ref_nll: object, test_nll: object, *, relative: bool = False,
              n_resamples: int = 1000, level: float = 0.95, seed: int | None = 0,
              block: int = 1) -> Interval:
    """Perplexity delta ``exp(mean test_nll) - exp(mean ref_nll)`` with a paired interval.

    ``relative=True`` gives ``ppl_test / ppl_ref - 1`` instead. Per-token NLLs are in nats.
    Options as in :func:`paired_bootstrap`; the result is the same as
    ``paired_bootstrap(ref_nll, test_nll, lambda r, t: exp(t.mean()) - exp(r.mean()), ...)``
    with the same seed, computed from resampled means only (fast).
    """
    r = _as_series(ref_nll, "ref_nll")
    t = _as_series(test_nll, "test_nll")
    if r.size != t.size:
        raise ValueError(f"ref_nll has {r.size} values and test_nll has {t.size}; paired "
                         "samples must have the same length")

    def stat(mr: np.ndarray | float, mt: np.ndarray | float) -> np.ndarray:
        if relative:
            return np.expm1(np.subtract(mt, mr))
        return np.exp(mt) - np.exp(mr)

    estimate = float(stat(r.mean(), t.mean()))
    return _bootstrap((r, t), estimate, stat, n_resamples=n_resamples, level=level, seed=seed,
                      block=block, means=True)


def mean_ci(values: object, *, n_resamples: int = 1000, level: float = 0.95,
            seed: int | None = 0, block: int = 1) -> Interval:
    """Mean of per-unit values (per-token KL, top-1 agreement 0/1...) with a bootstrap interval.

    Options as in :func:`paired_bootstrap`.
    """
    v = _as_series(values, "values")
    return _bootstrap((v,), float(v.mean()), lambda mv: mv, n_resamples=n_resamples,
                      level=level, seed=seed, block=block, means=True)
