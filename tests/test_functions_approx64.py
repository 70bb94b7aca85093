"""The float64 approximations of :mod:`precisim.emulation.functions.approx64` stay within the
error bounds that the correctly rounded cores' guards rely on: the fitted tables against
mpmath on dense grids, ``exp64`` and ``gelu64`` against mpmath at random and edge inputs,
eagerly and compiled (bit-identical), and ``fma64`` against the exact fused multiply-add."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import pytest
import torch
from precisim.emulation.functions import approx64 as A

U = 2.0**-53


def _mp_gelu(x: float):  # noqa: ANN202 - an mpmath value
    v = mpmath.mpf(x)
    return v / 2 * mpmath.erfc(-v / mpmath.sqrt(2))


def _max_rel(got: torch.Tensor, xs: torch.Tensor, ref) -> float:  # noqa: ANN001
    """The largest relative error of ``got`` against ``ref(x)`` (mpmath, 40 digits), in u."""
    worst = mpmath.mpf(0)
    with mpmath.workdps(40):
        for x, y in zip(xs.tolist(), got.tolist()):
            ex = ref(x)
            if ex == 0:
                assert y == 0
                continue
            worst = max(worst, abs((mpmath.mpf(y) - ex) / ex))
    return float(worst / mpmath.mpf(U))


def _gelu_inputs() -> torch.Tensor:
    """float32 values: uniform on [-15, 15], near zero over 40 binades, the clamp's ends and
    their neighbours, small integers and halves."""
    g = torch.Generator().manual_seed(64)
    parts = [torch.rand(3000, generator=g) * 30 - 15,
             torch.randn(800, generator=g) * torch.exp2(-torch.rand(800, generator=g) * 40),
             torch.tensor([15.0, -15.0, 14.999999, -14.999999, 1e-30, -1e-30, 2.0**-149]),
             torch.arange(-30, 31) / 2.0]
    return torch.cat(parts).double()


def _compiled(fn):  # noqa: ANN001, ANN202
    return torch.compile(fn, dynamic=True, fullgraph=True)


def test_fitted_tables_are_within_their_stated_errors() -> None:
    """The fits as stored (float64 coefficients, evaluated exactly) on 4001 points of each
    interval: the 2.9u and 2.2u of the module's error budgets. Perturbing one coefficient of
    P by a part in 10^12 fails this."""
    err = A.fit_errors()
    assert err["E"] < 2.0**-51.5
    assert err["PD"] < 2.0**-51.9


@pytest.mark.slow
def test_fit_reproduces_the_stored_tables() -> None:
    """``fit()`` (deterministic, pure Python) gives the stored coefficients bit for bit."""
    tabs = A.fit()
    assert tabs == {"E": A._E, "P": A._P, "D": A._D}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_gelu64_is_within_its_bound(mode: str) -> None:
    """Relative error at most the 86u of the budget for float32 inputs (measured: about 9u),
    so inside the 128u guard; eager and compiled give the same bits."""
    x = _gelu_inputs()
    got = A.gelu64(x) if mode == "eager" else _compiled(A.gelu64)(x)
    assert torch.equal(got.view(torch.int64), A.gelu64(x).view(torch.int64))
    assert _max_rel(got, x, _mp_gelu) < 86
    assert A.GELU_GUARD == 128 * U


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_exp64_is_within_its_bound(mode: str) -> None:
    """Relative error at most the 45u of the budget over [-708, 709] (measured: about 4u),
    at random points, integers, half-integers and multiples of ln 2 (the reduction's edges).
    A second constant ``L2 = ln 2 - L1`` computed in float64 (its 45 low bits lost) fails
    this by a factor 5."""
    g = torch.Generator().manual_seed(2)
    ln2 = math.log(2.0)
    k = torch.arange(-1021, 1021, 37, dtype=torch.float64)
    y = torch.cat([torch.rand(3000, generator=g, dtype=torch.float64) * 1417 - 708,
                   torch.randn(1000, generator=g, dtype=torch.float64),
                   torch.arange(-708, 710, 7, dtype=torch.float64) + 0.5,
                   k * ln2, (k + 0.5) * ln2, torch.tensor([-708.0, 709.0, 0.0],
                                                          dtype=torch.float64)])
    got = A.exp64(y) if mode == "eager" else _compiled(A.exp64)(y)
    assert torch.equal(got.view(torch.int64), A.exp64(y).view(torch.int64))
    assert _max_rel(got, y, mpmath.exp) < 45


def test_gelu64_special_values_and_clamp() -> None:
    x = torch.tensor([-0.0, 0.0, math.inf, -math.inf, math.nan, 15.5, 1e30, -15.5, -1e30],
                     dtype=torch.float64)
    y = A.gelu64(x)
    assert y[0].item() == 0 and math.copysign(1, y[0].item()) < 0
    assert y[1].item() == 0 and math.copysign(1, y[1].item()) > 0
    assert y[2].item() == math.inf and math.isnan(y[4].item())
    assert y[5].item() == 15.5 and y[6].item() == 1e30  # 1 - Q(x) rounds to 1
    neg = y[[3, 7, 8]]
    assert bool(((neg < 0) & (neg.abs() < 2.0**-160)).all())


def test_fma64_is_the_compiled_fma_eagerly_too() -> None:
    """Eager ``fma64`` equals the compiled one bit for bit, and, where the machine fuses,
    the correctly rounded ``a * b + c`` (exact in Fractions) on the probe operands, among
    which the unfused result differs."""
    a, b, c = A._fma64_probe_args()
    eager = A.fma64(a, b, c)
    comp = _compiled(A.fma64)(a, b, c)
    assert torch.equal(eager.view(torch.int64), comp.view(torch.int64))
    if A.fma64_fused():
        want = torch.tensor([float(Fraction(x) * Fraction(y) + Fraction(z))
                             for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())],
                            dtype=torch.float64)
        assert torch.equal(eager.view(torch.int64), want.view(torch.int64))
        assert int((eager != a * b + c).sum()) > 200


@pytest.mark.parametrize("fn", ["exp", "sigmoid", "silu", "gelu", "gelu_tanh", "gelu_sigmoid"])
def test_float64_forms_stay_inside_their_guards(fn: str) -> None:
    """The float64 form of each function that uses exp64 or gelu64, at float32 inputs over
    its clamp interval (and the asymptotes' region), is within its guard of the exact value
    (mpmath, 40 digits): the certificate the correctly rounded cores rely on. The largest
    error is reported relative to the guard; a guard of the earlier 2^-47 without the
    argument's amplification fails for gelu_tanh."""
    from precisim.emulation.functions.core import FN_DEFS, Fn

    d = FN_DEFS[Fn(fn)]
    g = torch.Generator().manual_seed(7)
    lo, hi = max(d.lo, -700.0), min(d.hi, 700.0)
    x = torch.cat([torch.rand(1500, generator=g) * (hi - lo) + lo,
                   torch.randn(1500, generator=g) * 6,
                   torch.tensor([lo, hi, 0.5, -0.5, 1e-20, -1e-20])]).double()
    xc = x.clamp(d.lo, d.hi)
    v = d.fast(xc)
    eps = d.guard(xc)
    eps = eps if isinstance(eps, torch.Tensor) else torch.full_like(x, eps)
    worst = 0.0
    with mpmath.workdps(40):
        for xi, vi, ei in zip(xc.tolist(), v.tolist(), eps.tolist()):
            ex = d.mp(mpmath.mp, mpmath.mpf(xi))
            if ex == 0:
                continue
            worst = max(worst, float(abs((mpmath.mpf(vi) - ex) / ex)) / ei)
    assert worst < 1.0, worst
