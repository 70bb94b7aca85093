"""The float-only helpers of the function units' compiled kernels (docs/arithmetic.md section
7.1) and their one-pass form, each against the slower form it replaces, bit for bit:
``grid_rne`` against the decision-table ``grid_fast`` (exact ties included); ``add_rne32``
against the float32 rounding of the round-to-odd sum and of the exact sum; the one-pass
kernel that marks its hard cases NaN (only those re-run) against the two-pass kernel and the
exact reference; and compiled kernels keep -0.0 results (a captured -0.0 constant was traced
as +0.0)."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from precisim.emulation.functions import FunctionUnit, get_function_unit
from precisim.emulation.functions.core import (
    add_rne32,
    add_ro,
    grid_fast,
    grid_rne,
)
from precisim.formats import Overflow, Rounding, get_format, kernels
from precisim.formats.reference import round_to_float_format

sys.path.insert(0, str(Path(__file__).parent))
from test_functions import adversarial_fp32  # noqa: E402


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int64) == b.view(torch.int64)) | (a.isnan() & b.isnan())


def test_grid_rne_equals_grid_fast() -> None:
    """The magic-constant rounding to multiples of 2^-F equals the decision-table one,
    exact ties (odd multiples of 2^-(F+1)) included, for |t| up to 2^13."""
    g = torch.Generator().manual_seed(6)
    for F in (1, 7, 12, 24, 28):
        t = torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * 300,
                       (torch.randint(-2**20, 2**20, (20000,), generator=g).double() * 2 + 1)
                       * 2.0 ** -(F + 1),
                       torch.tensor([8191.75, -8191.75, 0.0, 2.0**-60, -2.0**-60],
                                    dtype=torch.float64)])
        t = t.clamp(-8192, 8192)
        a, b = grid_rne(t, F), grid_fast(t, F)
        assert torch.equal(a, b), F  # (== : a zero's sign may differ, see grid_rne)


def _add_rne32_cases() -> tuple[torch.Tensor, torch.Tensor]:
    """Addends (float64) where rounding the float64 sum to float32 goes wrong or nearly so:
    float32 midpoints (normal and subnormal) plus a tiny part of either sign or none (down to
    2^-1074, whose product with half an ulp underflows), sums of
    float32 products and float32 values, the overflow midpoint 2^128 - 2^103 with a sticky
    part of either sign, sums beyond it, signed zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(11)
    n = 1 << 15
    f32 = torch.randint(-2**31, 2**31, (3, n), generator=g, dtype=torch.int64).to(torch.int32)
    r = f32.view(torch.float32).double()
    r = torch.where(r.isfinite(), r, 1.5)
    a, b = [r[0] * r[1]], [r[2]]
    x = (torch.randn(n, generator=g, dtype=torch.float64)
         * 2.0 ** torch.randint(-149, 127, (n,), generator=g)).float()
    up = torch.nextafter(x, torch.full_like(x, math.inf)).double()
    mid = (x.double() + up) / 2
    mid = mid[mid.isfinite()]
    tiny = mid * 2.0 ** -60 * torch.rand(mid.numel(), generator=g, dtype=torch.float64)
    a += [mid, mid, mid]
    b += [tiny, -tiny, torch.zeros_like(mid)]
    sub = torch.randint(-2**12, 2**12, (n,), generator=g).double() * 2 + 1  # odd
    a += [sub * 2.0 ** -150] * 2  # subnormal midpoints (and 2^-150 itself)
    b += [sub * 2.0 ** -200, -sub * 2.0 ** -200]
    T = 2.0**128 - 2.0**103
    edge = [(T, 2.0**-900), (T, -2.0**-900), (T, 0.0), (-T, 2.0**-900), (-T, -2.0**-900),
            (T, -2.0**52), (T - 2.0**75, 2.0**-30), (2.0**128, -1.0), (2.0**129, -1.0),
            (-2.0**129, 1.0), (math.inf, -1.0), (-math.inf, 1.0), (math.inf, -math.inf),
            (math.nan, 1.0), (0.0, -0.0), (-0.0, -0.0), (-0.0, 0.0), (1.0, -1.0),
            (2.0**-149, -2.0**-150), (2.0**-150, 2.0**-300), (2.0**-150, -2.0**-300),
            (2.0**-150, 2.0**-1000), (3 * 2.0**-150, -2.0**-1000), (1 + 2.0**-24, 2.0**-1074)]
    a.append(torch.tensor([e[0] for e in edge], dtype=torch.float64))
    b.append(torch.tensor([e[1] for e in edge], dtype=torch.float64))
    return torch.cat(a), torch.cat(b)


def _exact_rne32(a: float, b: float) -> float:
    """float32(a + b) from the exact sum (the decision table); IEEE 754 specials."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return float(torch.tensor(a, dtype=torch.float64) + b)
    s = Fraction(a) + Fraction(b)
    if s == 0:  # IEEE 754 RNE: -0 only for (-0) + (-0)
        return -0.0 if math.copysign(1, a) < 0 and math.copysign(1, b) < 0 else 0.0
    return float(round_to_float_format(s, get_format("fp32"), Rounding.NEAREST_EVEN,
                                       Overflow.INF))


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_add_rne32(backend: str) -> None:
    """``add_rne32`` (float operations only) equals float32 of the round-to-odd sum
    (``add_ro``, the form it replaces in the units' fp32 working rounding) bit for bit on
    every case, and the float32 rounding of the exact sum (Fractions) on a sample of every
    kind of case and on all the midpoint, subnormal and edge cases."""
    a, b = _add_rne32_cases()
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        got = kernels.run(add_rne32, ("test-add-rne32",), a.numel(), a, b).float()
    finally:
        kernels.set_backend(old)
    want = add_ro(a, b).float()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), [(a[i].item(), b[i].item(), got[i].item(), want[i].item())
                              for i in (~same).nonzero().flatten()[:5]]
    n = 1 << 15
    idx = list(range(0, n, 64)) + list(range(n, a.numel(), 7)) + list(
        range(a.numel() - 24, a.numel()))
    for i in idx:
        w = _exact_rne32(a[i].item(), b[i].item())
        g = got[i].item()
        assert (math.isnan(w) and math.isnan(g)) or (
            g == w and math.copysign(1, g) == math.copysign(1, w)), (a[i].item(), b[i].item())


def _rsqrt_rtz() -> FunctionUnit:
    """rsqrt rounded toward zero: powers of 4 are hard cases (the float64 value straddles
    the exact 2^-k), so the exact fallback is forced at known places."""
    return FunctionUnit("t-rsqrt-rtz-mark", function="rsqrt", method="exact",
                        output_rounding="rtz")


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_hard_cases_marked_nan_in_one_pass(backend: str) -> None:
    """A batch with powers of 4 (hard cases) planted among random inputs, NaN inputs and
    negative ones (NaN results that are not hard cases) goes through the marking kernel: its
    NaN results are exactly the hard cases and the NaN results of NaN or negative inputs, its
    count is the number of hard cases, and the unit's result equals the kernel with the mask
    (two passes) everywhere else and the exact reference on every hard element."""
    from precisim.emulation.functions.units import _kernel

    u = _rsqrt_rtz()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32 * 4096, generator=g) * 100 + 0.5
    planted = torch.tensor([3 * 4096 + 17, 3 * 4096 + 4000, 30 * 4096 + 5])
    x[planted] = torch.tensor([4.0**-20, 16.0, 4.0**30])
    x[[7, 9]] = torch.tensor([math.nan, -3.0])
    old = kernels.get_backend()
    try:
        kernels.set_backend(backend)
        got = u(x)
        marked, count = kernels.run(_kernel(u, mark=True), ("function-unit-mark", u),
                                    x.numel(), x)
        two_pass, hard = kernels.run(_kernel(u), ("function-unit", u), x.numel(), x)
    finally:
        kernels.set_backend(old)
    assert hard.nonzero().reshape(-1).tolist() == planted.tolist() and float(count) == 3
    assert marked.isnan().nonzero().reshape(-1).tolist() == [7, 9, *planted.tolist()]
    keep = ~hard
    assert torch.equal(got[keep].view(torch.int32), two_pass[keep].view(torch.int32))
    want = [float(u.reference(v)) for v in x[planted].tolist()]
    assert got[planted].tolist() == want


@pytest.mark.parametrize("name", ["silu-exact", "rcp-exact", "rcp-newton1"])
def test_compiled_kernel_keeps_negative_zero(name: str) -> None:
    """The compiled kernel returns the eager kernel's bits on the adversarial inputs, -0.0
    results included (silu(-inf) = -0, rcp(-inf) = -0): a -0.0 captured as a Python float
    was traced as a symbolic float and became +0.0."""
    from precisim.emulation.functions.units import _fast_tables, _kernel

    u = get_function_unit(name)
    x = adversarial_fp32(u.function.value)
    tabs = _fast_tables(u, x.device)
    k = _kernel(u)
    want = k(x, *tabs)[0]
    got = kernels._compile(k)(x, *tabs)[0]
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same].tolist()
    neg_inf = x == -math.inf
    assert bool(torch.signbit(got[neg_inf]).all()) and bool((got[neg_inf] == 0).all())


def test_tanh64_relative_error_below_2_pow_minus_50() -> None:
    """The float64 tanh of the correctly rounded units (``t / (t + 2)``, ``t = expm1(2x)``)
    is within 2^-50 (relative) of tanh in mpmath on |x| <= 40 (its clamp), far inside the
    2^-47 guard the hard-case test assumes: tiny, moderate and large arguments of both signs,
    and every fp16 value in range; -0 stays -0."""
    import mpmath
    from precisim.emulation.functions.core import FN_DEFS, Fn

    d = FN_DEFS[Fn.TANH]
    assert (d.lo, d.hi) == (-40.0, 40.0)
    g = torch.Generator().manual_seed(3)
    codes = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.cat([codes.double(), torch.randn(4000, generator=g, dtype=torch.float64) * 8,
                   torch.tensor([2.0**-1074, 2.0**-500, 1e-8, 0.5, 19.0, 40.0],
                                dtype=torch.float64)])
    x = x[x.isfinite() & (x.abs() <= 40) & (x != 0)]
    x = torch.cat([x, -x])
    v = d.fast(x)
    with mpmath.workprec(120):
        ref = [mpmath.tanh(mpmath.mpf(xi)) for xi in x.tolist()]
        worst = max(abs(float((mpmath.mpf(vi) - r) / r)) for vi, r in zip(v.tolist(), ref))
    assert worst < 2.0**-50, worst
    z = d.fast(torch.tensor([-0.0], dtype=torch.float64))
    assert z.item() == 0 and math.copysign(1, z.item()) < 0
