"""Stochastic rounding: reproducibility, unbiasedness, r-bit behaviour, fast path == reference.

Definition (``Rounding.STOCHASTIC``): with r random bits, the exact fraction f in [0, 1) of an
ulp is truncated to t = floor(f * 2^r), and the magnitude rounds up iff t + R >= 2^r for R
uniform in [0, 2^r). So P(up) = t / 2^r exactly: unbiased when f has at most r bits, biased
toward zero by (f - t/2^r) ulp otherwise (Fitzgibbon & Felix, ARITH 2025).

Statistical checks use a z-score bound of 5 standard deviations: for N independent draws the
sample mean of a two-point variable {lo, hi} with P(hi) = p has standard deviation
(hi - lo) * sqrt(p (1 - p) / N); a correct implementation fails a 5-sigma bound with
probability below 1e-6 per check, and the seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from _format_cases import bits_to_tensor, exact_values
from precisim.formats import get_format, quantize
from precisim.formats import reference as ref
from precisim.formats.descriptor import IntFormat
from precisim.formats.quantize import MAX_SR_BITS, random_bits, round_f32_bits
from precisim.formats.rounding import Overflow, Rounding

SR = Rounding.STOCHASTIC
Z = 5.0  # z-score bound (see the module docstring)


pytestmark = pytest.mark.usefixtures("eager_single_thread")


def _x(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3


# -- reproducibility ----------------------------------------------------------------------------

def test_seed_reproducible_and_seeds_differ():
    x = _x()
    a = quantize(x, "e4m3", "sr", seed=123)
    b = quantize(x, "e4m3", "sr", seed=123)
    c = quantize(x, "e4m3", "sr", seed=124)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert not torch.equal(a, c)
    # every result is one of the two neighbours
    lo = quantize(x, "e4m3", "rd")
    hi = quantize(x, "e4m3", "ru")
    assert bool(((a == lo) | (a == hi)).all())
    assert bool((a == lo).any() and (a == hi).any())


def test_generator_reproducible():
    x = _x()
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    a = quantize(x, "e2m1", "sr", generator=g1)
    b = quantize(x, "e2m1", "sr", generator=g2)
    assert torch.equal(a, b)
    # a generator advances: the next call draws new bits
    a2 = quantize(x, "e2m1", "sr", generator=g1)
    assert not torch.equal(a, a2)
    # the same seed through `seed=` gives the same bits as a fresh generator with that seed
    assert torch.equal(quantize(x, "e2m1", "sr", seed=7), a)


@pytest.mark.parametrize("r", [1, 4, 8, MAX_SR_BITS])
def test_seed_path_is_random_bits_plus_kernel(r):
    """quantize(..., seed=s) == round_f32_bits(..., rand=random_bits(shape, r, seed=s))."""
    x = _x(2000, seed=r)
    fmt = get_format("e5m2")
    rand = random_bits(x.shape, r, x.device, seed=99)
    assert rand.dtype == torch.int32 and int(rand.min()) >= 0 and int(rand.max()) < (1 << r)
    want = round_f32_bits(x.view(torch.int32), fmt, SR, Overflow.SATURATE, rand=rand, sr_bits=r)
    got = quantize(x, fmt, "sr", sr_bits=r, seed=99)
    assert torch.equal(got.view(torch.int32), want)


def test_default_sr_bits_is_max():
    x = _x(1000)
    a = quantize(x, "e4m3", "sr", seed=5)
    b = quantize(x, "e4m3", "sr", sr_bits=MAX_SR_BITS, seed=5)
    assert torch.equal(a, b)


# -- fast path == reference with the same random integers ---------------------------------------

SR_FORMATS = ["e4m3", "e5m2", "e2m1", "e3m2", "e8m0", "bf16", "fp16", "binary8p3ue",
              "binary8p4se", "e4m3fnuz", "int8", "mxint8", "uint4"]


def _sr_inputs(fmt, seed: int) -> np.ndarray:
    """float32 bits: values spread over the format's range and beyond, tiny values (many
    dropped bits), exact values, specials."""
    rng = np.random.default_rng(seed)
    if isinstance(fmt, IntFormat):
        mx = float(fmt.max)
        x = rng.uniform(-1.5 * mx - 1, 1.5 * mx + 1, 600)
        tiny = rng.uniform(-1, 1, 100) * float(fmt.ulp) * 2.0 ** -rng.integers(0, 40, 100)
    else:
        e = rng.integers(fmt.emin - fmt.man_bits - 6, fmt.emax + 2, 600)
        x = rng.uniform(1, 2, 600) * np.exp2(e.astype(np.float64))
        x *= rng.choice([-1, 1], 600)
        tiny = rng.uniform(-1, 1, 100) * float(fmt.min_subnormal) * 2.0 ** -rng.integers(
            0, 40, 100)
    x = np.concatenate([x, tiny, [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0]])
    with np.errstate(over="ignore"):
        x32 = np.clip(x, -3.4e38, 3.4e38).astype(np.float32)
    x32[-5:] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)[:5]
    return x32.view(np.uint32)


def _ref_sr(x, fmt, overflow, rand: int, r: int):
    if isinstance(fmt, IntFormat):
        return ref.round_to_int_format(x, fmt, SR, overflow, sr_rand=rand, sr_bits=r)
    return ref.round_to_float_format(x, fmt, SR, overflow, sr_rand=rand, sr_bits=r)


def _bits(v) -> int:
    if isinstance(v, float) and math.isnan(v):
        return 0x7FC00000
    return ref.value_to_f32_bits(v)


@pytest.mark.parametrize("r", [1, 4, 13, MAX_SR_BITS])
@pytest.mark.parametrize("name", SR_FORMATS)
def test_fast_equals_reference_same_random_bits(name, r):
    fmt = get_format(name)
    bits = _sr_inputs(fmt, seed=r)
    xs = exact_values(bits)
    rand = random_bits((len(bits),), r, torch.device("cpu"), seed=r + 1000)
    policies = [Overflow.SATURATE]
    if isinstance(fmt, IntFormat):
        policies.append(Overflow.WRAP)
    else:
        policies += [p for p, ok in ((Overflow.INF, fmt.has_inf), (Overflow.NAN, fmt.has_nan))
                     if ok]
    x = bits_to_tensor(bits)
    for overflow in policies:
        got = round_f32_bits(x.view(torch.int32), fmt, SR, overflow, rand=rand, sr_bits=r)
        got = got.numpy().view(np.uint32)
        for i, xv in enumerate(xs):
            want = _bits(_ref_sr(xv, fmt, overflow, int(rand[i]), r))
            g = int(got[i])
            same = g == want or ((g & 0x7FFFFFFF) > 0x7F800000 and
                                 (want & 0x7FFFFFFF) > 0x7F800000)
            xf = float(bits[i:i + 1].view(np.float32)[0])
            assert same, (f"{name} r={r} {overflow.value}: x={xf!r} R={int(rand[i])}: "
                          f"got 0x{g:08x}, want 0x{want:08x}")


# -- unbiasedness and the r-bit truncation -----------------------------------------------------

def _mean_check(x: float, fmt, n: int, r: int | None, expect_p: float, seed: int):
    """Draw n SR results of x; check the mean against lo + (hi - lo) * expect_p (5 sigma)."""
    xt = torch.full((n,), x)
    lo = quantize(xt[:1], fmt, "rtz").item()
    hi = quantize(xt[:1], fmt, "ru" if x > 0 else "rd").item()
    assert lo != hi, "x must lie strictly between two neighbours"
    y = quantize(xt, fmt, "sr", sr_bits=r, seed=seed).double()
    assert bool(((y == lo) | (y == hi)).all())
    p_hat = float(((y - lo) / (hi - lo)).mean())
    sigma = math.sqrt(max(expect_p * (1 - expect_p), 1e-12) / n)
    assert abs(p_hat - expect_p) <= Z * sigma, (x, fmt, r, p_hat, expect_p, sigma)
    return lo, hi, p_hat


@pytest.mark.parametrize("name, x", [
    ("e4m3", 1.3),  # normal range
    ("e4m3", -0.0123),  # negative, subnormal range of E4M3 (2^-9 steps)
    ("e2m1", 2.7),
    ("e5m2", 5000.0),
    ("bf16", 1.0 + 2.0 ** -10),
    ("fp16", 1e-6),  # fp16 subnormal range
    ("e8m0", 3.3),  # between 2 and 4
])
def test_unbiased(name, x):
    """With the default 30 random bits, E[SR(x)] == x for every float32 x (f has <= 30 bits
    below the format's ulp here), within 5 sigma."""
    fmt = get_format(name)
    x32 = float(np.float32(x))
    lo = quantize(torch.tensor([x32]), fmt, "rtz").item()
    hi = quantize(torch.tensor([x32]), fmt, "ru" if x32 > 0 else "rd").item()
    p = (Fraction(x32) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
    _mean_check(x32, fmt, 200_000, None, float(p), seed=11)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_r_bit_probability_is_truncated_fraction_exactly(r):
    """Running every R in [0, 2^r) shows P(up) == floor(f * 2^r) / 2^r exactly."""
    fmt = get_format("e4m3")
    # x = 1 + f * 2^-3 with f = 0.3 rounded to float32: many more than r fraction bits
    x = np.float32(1 + 0.3 * 2.0 ** -3)
    f = (Fraction(float(x)) - 1) / Fraction(1, 8)
    t = math.floor(f * 2 ** r)
    rand = torch.arange(1 << r, dtype=torch.int32)
    xb = torch.full((1 << r,), float(x)).view(torch.int32)
    y = round_f32_bits(xb, fmt, SR, Overflow.SATURATE, rand=rand, sr_bits=r).view(torch.float32)
    ups = int((y == 1.125).sum())
    assert int(((y == 1.0) | (y == 1.125)).sum()) == 1 << r
    assert ups == t  # exactly floor(f 2^r) of the 2^r equally likely R values round up
    assert Fraction(ups, 1 << r) < f  # so the r-bit variant is biased toward zero here


@pytest.mark.parametrize("r", [2, 4])
def test_r_bit_bias_is_visible(r):
    """Statistically: the mean follows t/2^r, not f (the bias f - t/2^r is > 10 sigma)."""
    fmt = get_format("e4m3")
    x = float(np.float32(1 + 0.3 * 2.0 ** -3))
    f = float((Fraction(x) - 1) * 8)
    t = math.floor(f * 2 ** r)
    n = 200_000
    _, _, p_hat = _mean_check(x, fmt, n, r, t / 2 ** r, seed=r)
    sigma = math.sqrt(f * (1 - f) / n)
    assert abs(p_hat - f) > 10 * sigma  # the unbiased expectation is rejected


def test_r_bit_unbiased_when_fraction_fits():
    """f = 0.25 has 2 bits: with r >= 2 SR is exactly unbiased, with r = 1 it never rounds up."""
    fmt = get_format("e4m3")
    x = 1 + 0.25 * 2.0 ** -3
    _mean_check(x, fmt, 100_000, 2, 0.25, seed=3)
    y = quantize(torch.full((10_000,), x), fmt, "sr", sr_bits=1, seed=4)
    assert bool((y == 1.0).all())


def test_sr_int_format():
    fmt = get_format("int8")
    n = 200_000
    for x in (2.3, -2.3, 126.75, -127.5):
        x32 = float(np.float32(x))
        p = float(abs(Fraction(x32)) - math.floor(abs(x32)))
        xt = torch.full((n,), x32)
        y = quantize(xt, fmt, "sr", seed=17)
        lo, hi = math.floor(abs(x32)), math.floor(abs(x32)) + 1
        mags = y.abs()
        assert bool(((mags == lo) | (mags == hi)).all())
        p_hat = float((mags == hi).double().mean())
        assert abs(p_hat - p) <= Z * math.sqrt(p * (1 - p) / n), (x, p_hat)
    # mxint8: grid 2^-6; saturation at 127/64 and wrap
    mx = get_format("mxint8")
    y = quantize(torch.full((1000,), 1.99), mx, "sr", seed=1)
    assert set(y.tolist()) == {127 / 64}
    yw = quantize(torch.full((4000,), 1.99), mx, "sr", "wrap", seed=1)
    assert set(yw.tolist()) == {127 / 64, -2.0}


def test_sr_zero_inf_nan_and_exact_values_are_deterministic():
    fmt = get_format("e4m3")
    x = torch.tensor([0.0, -0.0, 1.0, -448.0, float("inf"), float("nan"), 2.0 ** -9])
    for seed in range(5):
        y = quantize(x, fmt, "sr", seed=seed)
        assert y[:4].tolist() == [0.0, -0.0, 1.0, -448.0]
        assert math.copysign(1, y[1].item()) == -1
        assert y[4].item() == 448.0 and math.isnan(y[5].item()) and y[6].item() == 2.0 ** -9
