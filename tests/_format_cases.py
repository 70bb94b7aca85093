"""Shared helpers for the format tests: input sets, an exact table oracle, bit comparisons.

``table_round`` is a second exact model of :func:`precisim.formats.reference.round_to_float_format`
that is fast enough for 16-bit formats: it looks the two neighbouring grid values up in a sorted
table of the format's values (numpy float64, where every format value, every midpoint between
two of them and every float32 input is exact) and decides with exact comparisons only. It shares
no code with either the reference or the kernels, and it is itself checked against the reference
in test_formats_exhaustive.py.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import numpy as np
import torch
from precisim.formats import FloatFormat, IntFormat
from precisim.formats import reference as ref
from precisim.formats.rounding import Overflow, Rounding

DETERMINISTIC = [r for r in Rounding if r.deterministic]
F32_MIN_NORMAL = 2.0 ** -126


def overflow_policies(fmt: FloatFormat | IntFormat) -> list[Overflow]:
    """Every overflow policy the format accepts."""
    if isinstance(fmt, IntFormat):
        return [Overflow.SATURATE, Overflow.WRAP]
    out = [Overflow.SATURATE]
    if fmt.has_inf:
        out.append(Overflow.INF)
    if fmt.has_nan:
        out.append(Overflow.NAN)
    return out


def _finite_values(fmt) -> list[Fraction]:
    """The distinct finite values of the format, both signs (<= 16 bits)."""
    if isinstance(fmt, IntFormat):
        return [k * fmt.ulp for k in range(fmt.qmin, fmt.qmax + 1)]
    # the finite magnitude codes are 0..max_code_magnitude (the special codes sit above them)
    mags = {fmt.magnitude_value(c) for c in range(fmt.max_code_magnitude + 1)}
    return sorted(mags | {-v for v in mags})


def grid_step_at_max(fmt) -> Fraction:
    """The distance from max to the next value of the unbounded grid."""
    if isinstance(fmt, IntFormat):
        return fmt.ulp
    return Fraction(2) ** (fmt.emax - fmt.man_bits)


def _to_f32(v: Fraction) -> np.float32:
    x = np.float32(float(v))
    assert Fraction(float(x)) == v, f"{v} is not a float32"
    return x


@cache
def input_bits(fmt) -> np.ndarray:
    """float32 bit patterns (uint32, sorted, unique) probing every rounding decision of ``fmt``.

    Every value of the format, every midpoint between neighbours (also between max and the next
    step of the unbounded grid, and the same below -max / qmin), the float32 neighbours of all
    of those, both signs, plus overflow, tiny, zero, inf and NaN inputs.
    """
    vals = _finite_values(fmt)
    step = grid_step_at_max(fmt)
    hi = max(vals)
    lo = min(vals)
    below = {lo - step, lo - 2 * step} if lo < 0 else set()
    ext = sorted(set(vals) | {hi + step, hi + 2 * step} | below)
    mids = [(a + b) / 2 for a, b in zip(ext, ext[1:], strict=False)]
    smallest = min(v for v in vals if v > 0)
    extra = [smallest / 2, smallest / 4, smallest * Fraction(3, 4), hi * 2, hi * 4, hi * 1024]
    extra += [Fraction(2) ** e for e in (-149, -140, -128, -127, -126, -125, -100, -64, -20)]
    f32_lim = Fraction(2) ** 128  # (beyond-max probes of E8M0 & co. may not be float32)
    base = [_to_f32(v) for v in (*ext, *mids) if abs(v) < f32_lim]
    base += [_to_f32(v) for v in extra if Fraction(2) ** -149 <= v < Fraction(2) ** 127]
    base = np.array(base, dtype=np.float32)
    base = np.concatenate([base, -base])
    with np.errstate(over="ignore"):
        near = np.concatenate([
            base,
            np.nextafter(base, np.float32(np.inf)),
            np.nextafter(base, np.float32(-np.inf)),
        ])
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38,
                         1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38], dtype=np.float32)
    allx = np.concatenate([near, specials]).view(np.uint32)
    return np.unique(allx)


def bits_to_tensor(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint32).view(np.int32).copy()).view(torch.float32)


def ref_bits(xs: list, fmt, rounding: Rounding, overflow: Overflow, *,
             flush_input: bool = False, flush_output: bool = False) -> np.ndarray:
    """float32 bits (uint32) of the exact reference result for each exact input value."""
    out = np.empty(len(xs), dtype=np.uint32)
    if isinstance(fmt, IntFormat):
        assert not flush_input and not flush_output
        for i, x in enumerate(xs):
            out[i] = _value_bits(ref.round_to_int_format(x, fmt, rounding, overflow))
        return out
    below = Fraction(2) ** -126 if flush_input else None
    for i, x in enumerate(xs):
        out[i] = _value_bits(ref.round_to_float_format(
            x, fmt, rounding, overflow, flush_input_below=below, flush_output=flush_output))
    return out


def _value_bits(v) -> int:
    if isinstance(v, float) and math.isnan(v):
        return 0x7FC00000
    return ref.value_to_f32_bits(v)


def exact_values(bits: np.ndarray) -> list:
    return [ref.f32_bits_to_value(int(b)) for b in bits]


def assert_same_bits(got: np.ndarray, want: np.ndarray, inputs: np.ndarray, what: str) -> None:
    """Equal float32 bit patterns, any NaN matching any NaN; report the first mismatches."""
    got = got.astype(np.uint32)
    want = want.astype(np.uint32)
    gnan = (got & 0x7FFFFFFF) > 0x7F800000
    wnan = (want & 0x7FFFFFFF) > 0x7F800000
    bad = np.where(~((got == want) | (gnan & wnan)))[0]
    if bad.size:
        rows = []
        for i in bad[:8]:
            x = inputs[i].view(np.float32) if inputs.dtype == np.uint32 else inputs[i]
            rows.append(
                f"  x={float(x)!r} (0x{int(inputs.view(np.uint32)[i]):08x}): got "
                f"{float(np.uint32(got[i]).view(np.float32))!r} (0x{int(got[i]):08x}), want "
                f"{float(np.uint32(want[i]).view(np.float32))!r} (0x{int(want[i]):08x})")
        raise AssertionError(f"{what}: {bad.size} of {len(got)} differ\n" + "\n".join(rows))


# -- fast exact table oracle (floats) ----------------------------------------------------------

@cache
def _table(fmt: FloatFormat):
    """Sorted non-negative grid (float64), with 0 first and the first step beyond max last,
    and the parity of each grid value's significand integer (hidden bit included)."""
    m = fmt.man_bits
    c = np.arange(fmt.max_code_magnitude + 1, dtype=np.int64)  # finite magnitudes, ascending
    E, M = c >> m, c & ((1 << m) - 1)
    sub = (E == 0) if fmt.subnormals else np.zeros_like(c, dtype=bool)
    n = np.where(sub, M, M + (1 << m))
    vals = np.ldexp(n.astype(np.float64), np.where(sub, 1, E) - fmt.bias - m)
    odd = (n & 1) == 1
    if not fmt.has_zero:  # E8M0: 0 is still the grid point below the smallest value
        vals, odd = np.concatenate([[0.0], vals]), np.concatenate([[False], odd])
    step = float(grid_step_at_max(fmt))
    grid = np.concatenate([vals, [vals[-1] + step]])
    odd = np.concatenate([odd, [False]])
    assert np.all(np.diff(grid) > 0) and vals[-1] == float(fmt.max)
    return grid, odd


def table_round(x32: np.ndarray, fmt: FloatFormat, rounding: Rounding, overflow: Overflow, *,
                flush_input: bool = False, flush_output: bool = False) -> np.ndarray:
    """Exact rounding of float32 inputs to ``fmt`` by table lookup; returns float32 results."""
    grid, odd = _table(fmt)
    with np.errstate(invalid="ignore"):  # (signalling NaN payloads)
        x = x32.astype(np.float64)
    nan_in = np.isnan(x)
    neg = np.signbit(x)
    a = np.abs(np.where(nan_in, 0.0, x))
    inf_in = np.isinf(a)
    a = np.where(inf_in, 0.0, a)
    if flush_input:
        a = np.where(a < F32_MIN_NORMAL, 0.0, a)
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[i], grid[i + 1]
    mid = (lo + hi) / 2  # exact in float64
    inexact = a != lo
    if rounding is Rounding.NEAREST_EVEN:
        up = (a > mid) | ((a == mid) & odd[i])
    elif rounding is Rounding.NEAREST_AWAY:
        up = a >= mid
    elif rounding is Rounding.TOWARD_ZERO:
        up = np.zeros_like(a, dtype=bool)
    elif rounding is Rounding.UP:
        up = ~neg
    elif rounding is Rounding.DOWN:
        up = neg.copy()
    elif rounding is Rounding.ODD:
        up = ~odd[i]
    else:
        raise AssertionError(rounding)
    r = np.where(inexact & up, hi, lo)
    r = np.where(a >= grid[-1], grid[-1], r)  # beyond the grid: overflows in every mode
    mx = float(fmt.max)
    over = (r > mx) | inf_in
    if overflow is Overflow.SATURATE:
        ov = mx
    elif overflow is Overflow.INF:
        ov = np.inf
    else:
        ov = np.nan
    ovv = np.where(inf_in & fmt.has_inf & (overflow is not Overflow.SATURATE), np.inf, ov)
    zero_in = (a == 0) & ~inf_in
    if not fmt.has_zero:
        r = np.where(r == 0, float(fmt.min_subnormal), r)
    if flush_output:
        r = np.where((r > 0) & (r < float(fmt.min_normal)) & ~over, 0.0, r)
    res = np.where(over, ovv, r)
    is_zero = (res == 0)
    if fmt.signed:
        if fmt.has_negative_zero:
            res = np.where(neg, -res, res)
        else:
            res = np.where(neg & ~is_zero, -res, res)
    else:
        # negative inputs: +0 if the magnitude rounds to zero (sign-aware mode), else NaN/+0
        neg_bad = neg & ~is_zero
        res = np.where(neg_bad, np.nan if fmt.has_nan else 0.0, res)
        res = np.where(neg & is_zero, 0.0, res)
    if not fmt.has_zero:
        res = np.where(zero_in | neg, np.nan, res)  # no zero, no negative values (E8M0)
    res = np.where(nan_in, np.nan, res)
    return res.astype(np.float32)
