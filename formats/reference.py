"""Slow, exact reference arithmetic on Python ``Fraction`` values.

This module is the specification the fast torch kernels are tested against bit for bit. It
shares no arithmetic with them: values are exact rationals, the remainder of a rounding is the
exact fraction of an ulp, and codes are assembled field by field. The one thing it shares is
the rounding decision table (:data:`precisim.formats.rounding.ROUNDING_RULES`: which
remainders round up under each mode), which every representation consults; the kernels are
also tested against independent oracles (ml_dtypes, torch's casts).
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

from .descriptor import FloatFormat, FormatError, IntFormat, floor_log2
from .rounding import ExactRemainder, Overflow, Rounding, round_up

Value = Fraction | float  # float only for nan / +-inf

NAN = float("nan")


def fraction_of_float(x: float) -> Value:
    """Exact value of a Python float (nan/inf are returned unchanged)."""
    if math.isnan(x) or math.isinf(x):
        return x
    return Fraction(x)


def f32_bits_to_value(bits: int) -> Value:
    """Exact value of a float32 bit pattern; -0.0 is returned as the float -0.0."""
    x = struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]
    if x == 0 and bits >> 31:
        return -0.0
    return fraction_of_float(x)


def value_to_f32_bits(v: Value) -> int:
    """Bit pattern of a value that is exactly a float32 (raises otherwise)."""
    if isinstance(v, float):
        return struct.unpack("<I", struct.pack("<f", v))[0]
    f = float(v)
    if Fraction(f) != v:
        raise ValueError(f"{v} is not exactly a float64")
    bits = struct.unpack("<I", struct.pack("<f", f))[0]
    back = struct.unpack("<f", struct.pack("<I", bits))[0]
    if Fraction(back) != v:
        raise ValueError(f"{v} is not exactly a float32")
    return bits


def _is_negative(v: Value) -> bool:
    return math.copysign(1.0, v) < 0 if isinstance(v, float) else v < 0


def _round_up(lo: int, frac: Fraction, negative: bool, rounding: Rounding,
              sr_rand: int | None, sr_bits: int) -> int:
    """1 if the magnitude lo + frac (0 <= frac < 1) rounds up to lo + 1, else 0 (the decision
    of :data:`precisim.formats.rounding.ROUNDING_RULES` on exact fractions)."""
    up = round_up(rounding, ExactRemainder(lo, frac, negative, sr_rand, sr_bits))
    return int(bool(up))


def round_to_float_format(
    x: Value,
    fmt: FloatFormat,
    rounding: Rounding = Rounding.NEAREST_EVEN,
    overflow: Overflow = Overflow.SATURATE,
    *,
    flush_input_below: Fraction | None = None,
    flush_output: bool = False,
    sr_rand: int | None = None,
    sr_bits: int = 24,
) -> Value:
    """Round an exact value to ``fmt``; returns the exact result value (Fraction, -0.0, nan, inf).

    ``flush_input_below``: magnitudes below it (the source type's smallest normal) are read as
    zero (DAZ). ``flush_output``: non-zero results below the smallest normal become zero (FTZ).
    """
    if isinstance(x, float) and math.isnan(x):
        return NAN
    negative = _is_negative(x)
    if negative and not fmt.signed:
        if x == 0 or (flush_input_below is not None and not isinstance(x, float)
                      and -x < flush_input_below):  # DAZ reads a tiny input as -0
            return Fraction(0) if fmt.has_zero else NAN
        # A negative value is outside an unsigned format: it becomes +0 only if its magnitude
        # rounds to zero under the sign-aware mode, else NaN (or +0 without a NaN code).
        return _unsigned_negative(x, fmt, rounding, sr_rand, sr_bits, flush_output)

    def signed(v: Value) -> Value:
        if isinstance(v, float):
            return -v if negative else v
        if v == 0:
            return -0.0 if negative and fmt.has_negative_zero else Fraction(0)
        return -v if negative else v

    if isinstance(x, float) and math.isinf(x):
        if fmt.has_inf and overflow is not Overflow.SATURATE:
            return signed(math.inf)
        return signed(_overflow_value(fmt, overflow))
    ax = abs(Fraction(x))
    if flush_input_below is not None and ax < flush_input_below:
        ax = Fraction(0)
    if ax == 0:
        if not fmt.has_zero:
            return NAN
        return signed(Fraction(0))
    lo, frac, ulp = _split_ulps(ax, fmt)
    up = _round_up(lo, frac, negative, rounding, sr_rand, sr_bits)
    result = (lo + up) * ulp
    if result == 0 and not fmt.has_zero:
        result = fmt.min_subnormal
    if result > fmt.max:
        return signed(_overflow_value(fmt, overflow))
    if flush_output and 0 < result < fmt.min_normal:
        result = Fraction(0)
    return signed(result)


def _split_ulps(ax: Fraction, fmt: FloatFormat) -> tuple[int, Fraction, Fraction]:
    """``(lo, frac, ulp)`` with ``ax = (lo + frac) * ulp``, ``0 <= frac < 1`` and ``ulp`` the
    spacing of ``fmt`` at ``ax > 0`` (section 1.6). Dyadic values (every value of a format and
    every exact sum or product of such values) are split with integer shifts, others with
    Fraction arithmetic; both give the same numbers."""
    num, den = ax.numerator, ax.denominator
    if den & (den - 1):  # not a power of two
        e = floor_log2(ax)
        ulp = Fraction(2) ** (max(e, fmt.emin) - fmt.man_bits)
        k = ax / ulp
        lo = math.floor(k)
        return lo, k - lo, ulp
    s = den.bit_length() - 1  # ax = num / 2^s
    g = max(num.bit_length() - 1 - s, fmt.emin) - fmt.man_bits  # ulp = 2^g
    ulp = Fraction(1 << g) if g >= 0 else Fraction(1, 1 << -g)
    sh = s + g  # ax / ulp = num / 2^sh
    if sh <= 0:
        return num << -sh, Fraction(0), ulp
    return num >> sh, Fraction(num & ((1 << sh) - 1), 1 << sh), ulp


def _unsigned_negative(x: Value, fmt: FloatFormat, rounding: Rounding, sr_rand: int | None,
                       sr_bits: int, flush_output: bool) -> Value:
    if isinstance(x, float) and math.isinf(x):
        return NAN if fmt.has_nan else Fraction(0)
    if not fmt.has_zero:
        return NAN
    ax = abs(Fraction(x))
    e_eff = max(floor_log2(ax), fmt.emin)
    ulp = Fraction(2) ** (e_eff - fmt.man_bits)
    k = ax / ulp
    lo = math.floor(k)
    up = _round_up(lo, k - lo, True, rounding, sr_rand, sr_bits)
    rounded = (lo + up) * ulp
    if rounded == 0 or (flush_output and rounded < fmt.min_normal):
        return Fraction(0)
    return NAN if fmt.has_nan else Fraction(0)


def _overflow_value(fmt: FloatFormat, overflow: Overflow) -> Value:
    if overflow is Overflow.SATURATE:
        return fmt.max
    if overflow is Overflow.INF:
        if not fmt.has_inf:
            raise FormatError(f"{fmt.name} has no infinity: overflow='inf' is not possible")
        return math.inf
    if overflow is Overflow.NAN:
        if not fmt.has_nan:
            raise FormatError(f"{fmt.name} has no NaN: overflow='nan' is not possible")
        return NAN
    raise FormatError(f"overflow={overflow.value!r} is for integer formats, not {fmt.name}")


def round_to_int_format(
    x: Value,
    fmt: IntFormat,
    rounding: Rounding = Rounding.NEAREST_EVEN,
    overflow: Overflow = Overflow.SATURATE,
    *,
    sr_rand: int | None = None,
    sr_bits: int = 24,
) -> Value:
    """Round an exact value to the integer grid of ``fmt``; returns the value (Fraction or nan).

    ``WRAP`` keeps the code modulo 2^bits (two's complement); non-finite inputs give NaN under
    ``WRAP`` and saturate otherwise. NaN stays NaN (the format has no NaN code).
    """
    if isinstance(x, float) and math.isnan(x):
        return NAN
    negative = _is_negative(x)
    if isinstance(x, float) and math.isinf(x):
        if overflow is Overflow.WRAP:
            return NAN
        return fmt.min if negative else fmt.max
    k = abs(Fraction(x)) / fmt.ulp
    lo = math.floor(k)
    q = lo + _round_up(lo, k - lo, negative, rounding, sr_rand, sr_bits)
    q = -q if negative else q
    if fmt.qmin <= q <= fmt.qmax:
        return q * fmt.ulp
    if overflow is Overflow.WRAP:
        q %= 1 << fmt.bits
        if fmt.signed and q >> (fmt.bits - 1):
            q -= 1 << fmt.bits
        if q < fmt.qmin:  # symmetric formats have no code for the most negative value
            q = fmt.qmin
        return q * fmt.ulp
    if overflow is not Overflow.SATURATE:
        raise FormatError(f"{fmt.name}: overflow={overflow.value!r} is not possible for integers; "
                          "accepted 'saturate' or 'wrap'")
    return (fmt.qmin if q < fmt.qmin else fmt.qmax) * fmt.ulp


def encode_value(v: Value, fmt: FloatFormat | IntFormat) -> int:
    """The code of a value that is exactly representable in ``fmt`` (the inverse of decode)."""
    if isinstance(fmt, IntFormat):
        if isinstance(v, float) and not v == 0:
            raise ValueError(f"{fmt.name} has no code for {v}")
        q = Fraction(v) / fmt.ulp
        if q.denominator != 1 or not fmt.qmin <= q <= fmt.qmax:
            raise ValueError(f"{v} is not a value of {fmt.name}")
        return int(q) % (1 << fmt.bits)
    sign_bit = 1 << (fmt.bits - 1) if fmt.signed else 0
    if isinstance(v, float) and math.isnan(v):
        if fmt.nan_code is None:
            raise ValueError(f"{fmt.name} has no NaN code")
        return fmt.nan_code
    negative = _is_negative(v)
    sign = sign_bit if negative else 0
    if isinstance(v, float) and math.isinf(v):
        if fmt.inf_magnitude_code is None:
            raise ValueError(f"{fmt.name} has no infinity")
        return sign | fmt.inf_magnitude_code
    av = abs(Fraction(v))
    if av == 0:
        if not fmt.has_zero:
            raise ValueError(f"{fmt.name} has no zero")
        return sign if fmt.has_negative_zero else 0
    e = floor_log2(av)
    if e < fmt.emin:
        mag = av / Fraction(2) ** (fmt.emin - fmt.man_bits)
    else:
        mag = (((e + fmt.bias) << fmt.man_bits)
               + (av / Fraction(2) ** e - 1) * (1 << fmt.man_bits))
    if mag.denominator != 1 or not 0 <= mag <= fmt.max_code_magnitude or (
        fmt.magnitude_value(int(mag)) != av
    ):
        raise ValueError(f"{v} is not a value of {fmt.name}")
    return sign | int(mag)


# ---------------------------------------------------------------------------------------------
# block scaling (docs/arithmetic.md section 2; precisim.formats.scaling documents the semantics)

def f32(v: Value) -> Value:
    """IEEE float32 round-to-nearest-even of an exact value (overflow to inf)."""
    from .catalog import get_format

    return round_to_float_format(v, get_format("fp32"), Rounding.NEAREST_EVEN, Overflow.INF)


def _ceil_log2(v: Fraction) -> int:
    e = floor_log2(v)
    return e if Fraction(2) ** e == v else e + 1


def pow2_scale_exponent_exact(amax: Value, elem: FloatFormat | IntFormat, rule: str) -> int | None:
    """The MX block scale exponent k (X = 2^k) of a block with absolute maximum ``amax``, or None
    for a NaN scale. ``rule`` is 'floor' (OCP MX v1.0 section 6.3), 'ceil', 'rceil' or 'even'."""
    if isinstance(amax, float) and (math.isnan(amax) or math.isinf(amax)):
        return None
    a = Fraction(amax)
    if a == 0:
        return -127
    emax = floor_log2(Fraction(elem.max))
    if rule == "floor":
        k = floor_log2(a) - emax
    elif rule == "ceil":
        k = _ceil_log2(a) - emax
    elif rule == "rceil":
        k = _ceil_log2(a / Fraction(elem.max))
    elif rule == "even":
        m = elem.man_bits if isinstance(elem, FloatFormat) else elem.qmax.bit_length() - 1
        if a < Fraction(2) ** -126:  # float32 subnormal amax: torchao's bit trick on raw bits
            k = -126 - emax if a >= Fraction(2**23 - 2 ** (22 - m), 2**149) else -1000
        else:
            e = floor_log2(a)
            carry = a >= Fraction(2) ** e * (2 - Fraction(1, 2 ** (m + 1)))
            k = e + int(carry) - emax
    else:
        raise ValueError(rule)
    k = max(k, -127)
    return None if k > 127 else k


def quantize_block_pow2_exact(values: list[Value], elem: FloatFormat | IntFormat, rule: str,
                              rounding: Rounding = Rounding.NEAREST_EVEN) -> list[Value]:
    """Dequantized values of one MX block (elements saturate at +-elem_max)."""
    finite = [v for v in values if not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))]
    if len(finite) != len(values):
        return [NAN] * len(values)
    amax = max((abs(Fraction(v)) for v in values), default=Fraction(0))
    k = pow2_scale_exponent_exact(amax, elem, rule)
    if k is None:
        return [NAN] * len(values)
    X = Fraction(2) ** k
    out: list[Value] = []
    for v in values:
        if isinstance(elem, IntFormat):
            p = round_to_int_format(Fraction(v) / X, elem, rounding, Overflow.SATURATE)
        else:
            p = round_to_float_format(Fraction(v) / X if v != 0 else v, elem, rounding,
                                      Overflow.SATURATE)
        # p * X is exact, but can exceed float32 (CEIL on an amax near 2^128): inf then
        out.append(f32(p * X) if not isinstance(p, float) else p)
    return out


def quantize_block_float_exact(values: list[Value], elem: FloatFormat | IntFormat,
                               scale_fmt: FloatFormat, g: Value = Fraction(1),
                               rounding: Rounding = Rounding.NEAREST_EVEN) -> list[Value]:
    """Dequantized values of one block with a float scale (fp32 or E4M3) and a second-level
    scale g (1 without one), emulating each float32 operation exactly (see scaling.py)."""
    if any(isinstance(v, float) and (math.isnan(v) or math.isinf(v)) for v in values):
        return [NAN] * len(values)
    bamax = max(abs(Fraction(v)) for v in values)
    raw = f32(f32(bamax / Fraction(elem.max)) * g)
    if scale_fmt.name == "fp32":
        bs = Fraction(1) if bamax == 0 else max(Fraction(raw), Fraction(2) ** -126)
    else:
        bs = round_to_float_format(raw, scale_fmt, Rounding.NEAREST_EVEN, Overflow.SATURATE)
    out: list[Value] = []
    for v in values:
        if bs == 0:
            out.append(Fraction(0))
            continue
        t = f32(f32(Fraction(v) * g) / bs)
        if isinstance(elem, IntFormat):
            q = round_to_int_format(t, elem, rounding, Overflow.SATURATE)
        else:
            q = round_to_float_format(t, elem, rounding, Overflow.SATURATE)
        out.append(f32(f32(Fraction(q) * bs) / g))
    return out


def nvfp4_global_scale_exact(tensor_amax: Value, elem_max: Fraction = Fraction(6),
                             scale_max: Fraction = Fraction(448)) -> Value:
    """NVFP4's second-level scale g = fl32(scale_max * elem_max / tensor_amax) (1 for amax 0)."""
    if Fraction(tensor_amax) == 0:
        return Fraction(1)
    return f32(scale_max * elem_max / Fraction(tensor_amax))
