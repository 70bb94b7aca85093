"""Conformance vectors: inputs and expected output bits that a hardware team runs against its RTL.

Two kinds, both computed by the slow exact references (Python ``Fraction`` arithmetic), never by
the fast torch kernels they are tested against:

* :func:`format_vectors`: float32 inputs and the code a conversion to a number format must
  produce (:func:`precisim.formats.reference.round_to_float_format` /
  ``round_to_int_format``, then ``encode_value``). Every code's exact value and its float32
  neighbours, every midpoint between neighbouring values (the ties) and its neighbours, the
  overflow boundary, the underflow region, zeros, infinities, NaNs, float32 subnormals, and
  random inputs.
* :func:`unit_vectors`: dot products ``d = sum_i a_i*b_i + c`` of a matrix unit, expected
  bits from :func:`precisim.emulation.reference.dot`, with adversarial cases (cancellation,
  wide exponent spread, exact ties at the accumulator's rounding, subnormals, overflow and
  special values) and random ones.

``write_vectors`` writes CSV or JSON; the JSON has a header (what was emulated, the precisim
version, a sha256 of the rows). On the command line::

    precisim vectors e4m3 --rounding rne --out e4m3_rne.json
    precisim vectors --unit h100-e4m3 --n 200 --out h100_e4m3.csv
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from precisim.formats import FloatFormat, FormatError, IntFormat, Overflow, Rounding, get_format
from precisim.formats.reference import (
    encode_value,
    f32_bits_to_value,
    round_to_float_format,
    round_to_int_format,
    value_to_f32_bits,
)

from .store import write_atomic

__all__ = ["Vectors", "code_value", "format_vectors", "rows_sha256", "unit_vectors",
           "write_vectors"]

F32 = get_format("fp32")
F32_MAX_BITS = 0x7F7FFFFF
F32_INF_BITS = 0x7F800000
QNAN_BITS = 0x7FC00000
SIGN32 = 0x80000000
_DAZ_BELOW = Fraction(1, 2**126)  # float32's smallest normal: DAZ reads smaller inputs as 0

#: formats whose codes are all enumerated by default (wider formats use boundary codes)
ALL_CODES_MAX_BITS = 8
#: the default dot length of units whose one block is huge (exact accumulators)
DEFAULT_K_CAP = 64


class Vectors(list):
    """A list of vector rows (dicts) with a ``meta`` dict describing what they test."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), meta: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(rows)
        self.meta: dict[str, Any] = dict(meta or {})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("precisim")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


# ---------------------------------------------------------------------------------------------
# float32 helpers

def _bits_of(x: float) -> int:
    """float32 bit pattern of a Python float that is exactly a float32 (or inf/nan)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _float_of(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _next_f32(bits: int, up: bool) -> int:
    """The float32 next to ``bits`` toward +inf (``up``) or -inf (NaN/inf saturate)."""
    x = np.float32(_float_of(bits))
    with np.errstate(over="ignore"):
        y = np.nextafter(x, np.float32(np.inf if up else -np.inf))
    return int(np.array(y, dtype=np.float32).view(np.uint32))


def _f32_around(v: Fraction) -> tuple[int, int]:
    """Bits of the largest float32 <= v and the smallest float32 >= v (inf beyond the range)."""
    fmax = F32.max
    if v > fmax:
        return F32_MAX_BITS, F32_INF_BITS
    if v < -fmax:
        return SIGN32 | F32_INF_BITS, SIGN32 | F32_MAX_BITS
    lo = round_to_float_format(v, F32, Rounding.DOWN, Overflow.SATURATE)
    hi = round_to_float_format(v, F32, Rounding.UP, Overflow.SATURATE)
    return value_to_f32_bits(lo), value_to_f32_bits(hi)


def _value_bits(v: Fraction | float) -> int:
    """float32 bits of an exact value that is a float32 (code values of any format are)."""
    if isinstance(v, float):
        return QNAN_BITS if math.isnan(v) else _bits_of(v)
    return value_to_f32_bits(v)


def _hex(code: int, bits: int) -> str:
    return f"0x{code:0{max(1, -(-bits // 4))}X}"


def _json_float(x: float) -> float | str:
    """Floats as JSON allows them: non-finite values as the strings nan, inf, -inf."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


# ---------------------------------------------------------------------------------------------
# format vectors

def _check_overflow(fmt: FloatFormat | IntFormat, overflow: Overflow | str | None) -> Overflow:
    if overflow is None:
        return Overflow.INF if fmt.has_inf else Overflow.SATURATE
    ovf = Overflow.parse(overflow)
    if isinstance(fmt, IntFormat):
        accepted = (Overflow.SATURATE, Overflow.WRAP)
    else:
        accepted = tuple(o for o in (Overflow.SATURATE, Overflow.INF, Overflow.NAN)
                         if o is Overflow.SATURATE or (o is Overflow.INF and fmt.has_inf)
                         or (o is Overflow.NAN and fmt.has_nan))
    if ovf not in accepted:
        raise ValueError(f"overflow={ovf.value!r} is not possible for {fmt.name}: accepted "
                         f"{', '.join(o.value for o in accepted)}")
    return ovf


def _check_rounding(rounding: Rounding | str) -> Rounding:
    rnd = Rounding.parse(rounding)
    if rnd is Rounding.STOCHASTIC:
        accepted = ", ".join(r.value for r in Rounding if r.deterministic)
        raise ValueError(f"rounding={rnd.value!r} is random: conformance vectors need a "
                         f"deterministic rounding ({accepted})")
    return rnd


def _magnitudes(fmt: FloatFormat | IntFormat, all_codes: bool) -> list[int]:
    """The non-negative codes (values >= 0) whose values and neighbours are tested."""
    if isinstance(fmt, IntFormat):
        top = fmt.qmax
        if all_codes:
            return list(range(top + 1))
        ks = {0, 1, 2, 3, top - 2, top - 1, top}
        for e in range(fmt.bits):
            ks |= {(1 << e) - 1, 1 << e, (1 << e) + 1}
        return sorted(k for k in ks if 0 <= k <= top)
    top = fmt.max_code_magnitude
    if all_codes:
        return list(range(top + 1))
    m = fmt.man_bits
    n_binades = 1 << fmt.exp_bits
    if fmt.exp_bits <= 5:
        binades = set(range(n_binades))
    else:  # the lowest, the highest, and those around 1.0; random inputs cover the rest
        binades = {0, 1, 2, 3, n_binades - 4, n_binades - 3, n_binades - 2, n_binades - 1}
        binades |= {fmt.bias + d for d in range(-2, 3)}
    mans = {0, 1, 2, (1 << m) - 2, (1 << m) - 1}
    mags = {(e << m) | man for e in binades for man in mans if 0 <= man < (1 << m)}
    return sorted(c for c in mags if 0 <= c <= top)


def _mag_value(fmt: FloatFormat | IntFormat, mag: int) -> Fraction:
    return mag * fmt.ulp if isinstance(fmt, IntFormat) else fmt.magnitude_value(mag)


def _format_inputs(fmt: FloatFormat | IntFormat, all_codes: bool, n_random: int,
                   seed: int) -> list[tuple[str, int]]:
    """(case, float32 bits) of every input, in order, first label kept for duplicates."""
    cases: list[tuple[str, int]] = []

    def add(case: str, bits: int) -> None:
        cases.append((case, bits & 0xFFFFFFFF))

    def around(case: str, v: Fraction, signs: Sequence[int]) -> None:
        """v itself when it is a float32, else the float32 values either side; and the
        float32 neighbours beyond those."""
        for s in signs:
            lo, hi = _f32_around(v * s)
            if lo == hi:
                add(case, lo)
            else:
                add(case + " (f32 below)", lo)
                add(case + " (f32 above)", hi)
            add(case + "-", _next_f32(lo, up=False))
            add(case + "+", _next_f32(hi, up=True))

    neg_signs = (1, -1)  # negative inputs are tested for unsigned formats too
    # specials and float32 landmarks
    for case, bits in (("zero", 0), ("-zero", SIGN32), ("inf", F32_INF_BITS),
                       ("-inf", SIGN32 | F32_INF_BITS), ("nan", QNAN_BITS),
                       ("-nan", SIGN32 | QNAN_BITS), ("snan", F32_INF_BITS | 1),
                       ("f32 max", F32_MAX_BITS), ("-f32 max", SIGN32 | F32_MAX_BITS),
                       ("f32 min subnormal", 1), ("-f32 min subnormal", SIGN32 | 1),
                       ("f32 max subnormal", 0x007FFFFF), ("f32 min normal", 0x00800000),
                       ("-f32 min normal", SIGN32 | 0x00800000), ("one", 0x3F800000)):
        add(case, bits)
    # every (or every boundary) code's value, its neighbours, the midpoint to the next code
    mags = _magnitudes(fmt, all_codes)
    top = fmt.qmax if isinstance(fmt, IntFormat) else fmt.max_code_magnitude
    for mag in mags:
        v = _mag_value(fmt, mag)
        for s in neg_signs:
            if s < 0 and mag == 0:
                continue
            b = value_to_f32_bits(v * s) if v else (SIGN32 if s < 0 else 0)
            add("value", b)
            add("value-", _next_f32(b, up=False))
            add("value+", _next_f32(b, up=True))
        if mag < top:
            mid = (v + _mag_value(fmt, mag + 1)) / 2
            around("midpoint", mid, neg_signs)
    if isinstance(fmt, IntFormat) and fmt.signed:
        mid = (fmt.min - fmt.ulp / 2)  # below the most negative value
        around("below min", mid, (1,))
    # overflow: the rounding boundary above max, the next value past max, twice max
    big = fmt.max
    step = fmt.ulp if isinstance(fmt, IntFormat) else Fraction(2) ** (fmt.emax - fmt.man_bits)
    around("overflow boundary", big + step / 2, neg_signs)
    around("above max", big + step, neg_signs)
    around("2x max", 2 * big, neg_signs)
    # underflow: fractions of the smallest positive value
    tiny = fmt.ulp if isinstance(fmt, IntFormat) else fmt.min_subnormal
    for name, frac in (("quarter min subnormal", Fraction(1, 4)),
                       ("half min subnormal", Fraction(1, 2)),
                       ("3/4 min subnormal", Fraction(3, 4)),
                       ("1.5x min subnormal", Fraction(3, 2))):
        around(name, tiny * frac, neg_signs)
    if isinstance(fmt, FloatFormat) and fmt.subnormals:
        around("min normal", fmt.min_normal, neg_signs)
        around("half min normal", fmt.min_normal / 2, neg_signs)
    # random inputs: 3/4 in and around the format's range, 1/4 any float32 bit pattern
    rng = np.random.default_rng(seed)
    n_near = n_random - n_random // 4
    if isinstance(fmt, IntFormat):
        lo_e, hi_e = -fmt.frac_bits - 3, fmt.emax + 3
    else:
        lo_e, hi_e = fmt.emin - fmt.man_bits - 3, fmt.emax + 3
    lo_e, hi_e = max(lo_e, -149), min(hi_e, 127)
    exps = rng.integers(lo_e, hi_e + 1, size=n_near)
    mans = rng.integers(0, 1 << 23, size=n_near)
    sgns = rng.integers(0, 2, size=n_near)
    for e, man, sg in zip(exps.tolist(), mans.tolist(), sgns.tolist()):
        # a float32 normal, or a subnormal 2^e with random lower bits
        bits = ((e + 127) << 23) | man if e >= -126 else (
            (1 << (e + 149)) | (man & ((1 << (e + 149)) - 1)))
        add("random", bits | (SIGN32 if sg else 0))
    for bits in rng.integers(0, 1 << 32, size=n_random // 4, dtype=np.uint64).tolist():
        add("random bits", int(bits))
    seen: set[int] = set()
    out = []
    for case, bits in cases:
        if bits not in seen:
            seen.add(bits)
            out.append((case, bits))
    return out


def _reference_round(v: Fraction | float, fmt: FloatFormat | IntFormat, rnd: Rounding,
                     ovf: Overflow, flush_input: bool, flush_output: bool) -> Fraction | float:
    if isinstance(fmt, IntFormat):
        return round_to_int_format(v, fmt, rnd, ovf)
    return round_to_float_format(v, fmt, rnd, ovf,
                                 flush_input_below=_DAZ_BELOW if flush_input else None,
                                 flush_output=flush_output)


def format_vectors(
    fmt: FloatFormat | IntFormat | str,
    rounding: Rounding | str = "rne",
    overflow: Overflow | str | None = None,
    n_random: int = 1000,
    seed: int = 0,
    *,
    all_codes: bool | None = None,
    flush_input: bool = False,
    flush_output: bool = False,
) -> Vectors:
    """Conversion vectors float32 -> ``fmt``: one row per input.

    Args:
        fmt: a format or its name (``"e4m3"``, ``"mxfp4"``'s element ``"e2m1"``, ``"int8"``...).
        rounding: a deterministic rounding (rne, rtz, ru, rd, rna, rto).
        overflow: saturate / inf / nan (floats), saturate / wrap (integers); default ``inf`` for
            formats with an infinity (IEEE 754 behaviour) and ``saturate`` otherwise.
        n_random: number of random inputs added to the systematic cases.
        seed: seed of the random inputs.
        all_codes: test every code's value and midpoint (default: formats of up to 8 bits).
            Wider formats use boundary codes: mantissa 0, 1, 2, max-1 and max of every binade
            (of the lowest four, the highest four and the five around 1.0 when the format has
            more than 5 exponent bits).
        flush_input: read float32 inputs below 2^-126 as zero (DAZ; float formats only).
        flush_output: results below the format's smallest normal become zero (FTZ).

    Each row: ``case`` (why the input is there), ``input_bits`` (float32 bit pattern, hex),
    ``input`` (its value), ``expected_code`` (the format's code, hex; two's complement for
    integers) and ``expected`` (its value). Inputs whose result is NaN in a format without a
    NaN code (FP4/FP6, integers) have no code and are left out (counted in ``meta``).
    """
    f = get_format(fmt)
    rnd = _check_rounding(rounding)
    ovf = _check_overflow(f, overflow)
    for what, v in (("n_random", n_random), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what}={v!r} is not valid: accepted an integer >= 0")
    if isinstance(f, IntFormat) and (flush_input or flush_output):
        raise ValueError(f"flush_input / flush_output are for float formats, not {f.name}")
    if all_codes is None:
        all_codes = f.bits <= ALL_CODES_MAX_BITS
    rows = []
    skipped = 0
    for case, bits in _format_inputs(f, bool(all_codes), n_random, seed):
        x = f32_bits_to_value(bits)
        r = _reference_round(x, f, rnd, ovf, flush_input, flush_output)
        if isinstance(r, float) and math.isnan(r) and not f.has_nan:
            skipped += 1
            continue
        code = encode_value(r, f)
        rows.append({"case": case, "input_bits": _hex(bits, 32), "input": _float_of(bits),
                     "expected_code": _hex(code, f.bits), "expected": float(r)})
    meta = {
        "kind": "format",
        "format": f.name,
        "description": f.description,
        "properties": f.properties(),
        "rounding": rnd.value,
        "overflow": ovf.value,
        "flush_input": flush_input,
        "flush_output": flush_output,
        "all_codes": bool(all_codes),
        "n_random": n_random,
        "seed": seed,
        "skipped_no_code": skipped,
        "encoding": "input_bits: IEEE 754 binary32 bit pattern of the input; expected_code: "
                    f"the {f.bits}-bit code of {f.name} (sign bit first"
                    + ("; two's complement" if isinstance(f, IntFormat) else "") + "), hex",
        "reference": "precisim.formats.reference (exact Fraction arithmetic)",
    }
    return Vectors(rows, meta)


# ---------------------------------------------------------------------------------------------
# matrix-unit vectors

def code_value(fmt: FloatFormat | IntFormat | str, code: int) -> float:
    """The value of one code as a Python float (exact: every format's values are float32
    values), -0.0 for a negative-zero code, nan / +-inf for the special codes."""
    f = get_format(fmt)
    v = f.decode_exact(code)
    if isinstance(v, float):
        return v
    x = float(v)
    if x == 0 and f.signed and isinstance(f, FloatFormat) and code >> (f.bits - 1):
        return -0.0
    return x


def _encode(fmt: FloatFormat | IntFormat, x: float) -> int:
    if isinstance(fmt, FloatFormat) and x == 0 and math.copysign(1.0, x) < 0:
        return encode_value(-0.0, fmt)
    return encode_value(x if isinstance(x, float) and not math.isfinite(x) else Fraction(x), fmt)


class _Sampler:
    """Random values of one input format, by exponent range, drawn from a numpy Generator."""

    def __init__(self, fmt: FloatFormat | IntFormat, rng: np.random.Generator) -> None:
        self.fmt = fmt
        self.rng = rng

    def _int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def _sign(self) -> int:
        return -1 if self.fmt.signed and self.rng.integers(0, 2) else 1

    def normal(self, e_lo: int | None = None, e_hi: int | None = None) -> float:
        """A nonzero value with exponent in [e_lo, e_hi] (clipped to the format), random sign
        (integers: the exponent of k * ulp)."""
        f = self.fmt
        if isinstance(f, IntFormat):
            fb = f.frac_bits
            lo = 1 if e_lo is None else 1 << max(0, min(f.bits - 2, e_lo + fb))
            hi = f.qmax if e_hi is None else (1 << max(0, e_hi + fb + 1)) - 1
            hi = max(lo, min(f.qmax, hi))
            return float(self._int(lo, hi) * f.ulp) * self._sign()
        lo_f = 1 if f.subnormals else 0
        top_e = f.max_code_magnitude >> f.man_bits
        e_lo_f = lo_f if e_lo is None else max(lo_f, min(top_e, e_lo + f.bias))
        e_hi_f = top_e if e_hi is None else max(e_lo_f, min(top_e, e_hi + f.bias))
        while True:
            mag = (self._int(e_lo_f, e_hi_f) << f.man_bits) | self._int(0, (1 << f.man_bits) - 1)
            if mag <= f.max_code_magnitude:
                return float(f.magnitude_value(mag)) * self._sign()

    def subnormal(self) -> float | None:
        """A subnormal value (None if the format has none)."""
        f = self.fmt
        if isinstance(f, IntFormat) or not f.subnormals or f.man_bits == 0:
            return None
        return float(f.magnitude_value(self._int(1, (1 << f.man_bits) - 1))) * self._sign()

    def mid(self) -> float:
        """A value of moderate magnitude (exponent within +-4 of 0)."""
        return self.normal(-4, 4)

    def low(self) -> float:
        """A value in the lowest binades of the format (its smallest normals)."""
        f = self.fmt
        if isinstance(f, IntFormat):
            return self.normal(-f.frac_bits, -f.frac_bits + 1)
        return self.normal(f.emin, f.emin + 2)

    def high(self) -> float:
        """A value in the top binade of the format."""
        f = self.fmt
        return self.normal(f.emax, f.emax)


def _pow2_in(fmt: FloatFormat | IntFormat, e: int) -> float | None:
    """2^e if it is a value of ``fmt``, else None."""
    v = Fraction(2) ** e
    if isinstance(fmt, IntFormat):
        return float(v) if (v / fmt.ulp).denominator == 1 and v <= fmt.max else None
    return float(v) if fmt.min_subnormal <= v <= fmt.max else None


Case = tuple[str, list[float], list[float], float]


def _tie_cases(unit: Any, k_len: int, c_fmt: FloatFormat | IntFormat) -> list[Case]:
    """Dot products whose exact value is a tie, or a hair above one, at the precision of the
    rounding that first sees it (the block accumulator, or the promotion register).

    One product p = 2^t (a and b powers of two), c = C = 2^(t + P + 1) * (1 + j 2^-P) with P
    the fraction bits of that rounding: C + p lies halfway between two neighbours; j even or
    odd decides where ties-to-even goes. The other products are zero (or one tiny one, for
    "just above").
    """
    if not isinstance(c_fmt, FloatFormat):
        return []
    if unit.promotion_interval:
        prec = unit.promotion_format.man_bits
    else:
        blk = unit.block_format
        if not isinstance(blk, FloatFormat):
            return []
        prec = blk.man_bits
    a_fmt, b_fmt = unit.a_format, unit.b_format
    for t in (0, -2, 2, -6, 6):
        pair = None
        for ea in sorted(range(-40, 41), key=abs):
            a, b = _pow2_in(a_fmt, ea), _pow2_in(b_fmt, t - ea)
            if a is not None and b is not None:
                pair = (a, b, ea)
                break
        if pair is None:
            continue
        a, b, ea = pair
        tiny = _pow2_in(a_fmt, ea - 3)
        out: list[Case] = []
        for j, parity in ((2, "even"), (3, "odd")):
            big = Fraction(2) ** (t + prec + 1) * (1 + Fraction(j, 2**prec))
            if big > c_fmt.max:
                continue
            for sign in (1, -1) if a_fmt.signed else (1,):
                tag = f"{parity}, {'+' if sign > 0 else '-'}"
                c = float(big) * sign
                av, bv = [0.0] * k_len, [0.0] * k_len
                av[0], bv[0] = a * sign, b
                out.append((f"tie ({tag})", av, bv, c))
                if tiny is not None and k_len > 1:
                    av2, bv2 = list(av), list(bv)
                    av2[1], bv2[1] = tiny * sign, b
                    out.append((f"just above tie ({tag})", av2, bv2, c))
                av3 = list(av)
                av3[0] = -a * sign
                out.append((f"tie below ({tag})", av3, bv, c))
        if out:
            return out
    return []


def _fixed_cases(unit: Any, k_len: int, c_fmt: FloatFormat | IntFormat, sa: _Sampler,
                 sb: _Sampler) -> list[Case]:
    """Zeros, signed zeros, NaN / inf inputs, overflow of the accumulator, ties."""
    a_fmt, b_fmt = unit.a_format, unit.b_format
    zeros = [0.0] * k_len
    one_b = _pow2_in(b_fmt, 0) or float(b_fmt.max)
    cases: list[Case] = [("all zero", list(zeros), list(zeros), 0.0)]
    if a_fmt.has_negative_zero and c_fmt.has_negative_zero:
        cases.append(("all -0 products, c = -0", [-0.0] * k_len, [one_b] * k_len, -0.0))
    b_pos = [abs(sb.mid()) for _ in range(k_len)]
    if a_fmt.has_nan:
        av = [sa.mid() for _ in range(k_len)]
        av[k_len // 2] = math.nan
        cases.append(("nan input", av, list(b_pos), 0.0))
    if a_fmt.has_inf:
        av = [sa.mid() for _ in range(k_len)]
        av[0] = math.inf
        cases.append(("inf input", list(av), list(b_pos), 0.0))
        if k_len > 1:
            av[1] = -math.inf
            cases.append(("inf - inf", av, list(b_pos), 0.0))
        av = list(zeros)
        av[0] = math.inf
        cases.append(("inf * 0", av, list(zeros), 0.0))
    if isinstance(c_fmt, FloatFormat):
        cmax = float(c_fmt.max)
        big_a, big_b = [float(a_fmt.max)] * k_len, [float(b_fmt.max)] * k_len
        cases.append(("overflow", big_a, big_b, cmax))
        if a_fmt.signed:
            neg_a = [-x for x in big_a]
            cases.append(("-overflow", neg_a, big_b, -cmax))
            cases.append(("near max, no overflow", neg_a, big_b, cmax))
    cases.extend(_tie_cases(unit, k_len, c_fmt))
    return cases


def _unit_cases(unit: Any, k_len: int, n: int, rng: np.random.Generator) -> list[Case]:
    """(case, a, b, c) of every vector: the fixed adversarial set, then n drawn ones
    (random, cancellation, exponent spread, subnormal, in turn)."""
    a_fmt, b_fmt = unit.a_format, unit.b_format
    c_fmt = unit.promotion_format if unit.promotion_interval else unit.acc_format
    sa, sb, sc = _Sampler(a_fmt, rng), _Sampler(b_fmt, rng), _Sampler(c_fmt, rng)
    cases = _fixed_cases(unit, k_len, c_fmt, sa, sb)
    kinds = ("random", "cancellation", "exponent spread", "subnormal")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        a = [sa.mid() for _ in range(k_len)]
        b = [sb.mid() for _ in range(k_len)]
        c = sc.mid() if rng.integers(0, 2) else 0.0
        if kind == "cancellation" and a_fmt.signed and k_len >= 2:
            # the second half cancels the first exactly (in shuffled positions); one small
            # term and a small c are what is left of a sum with large partial sums
            half = k_len // 2
            dst = (half + rng.permutation(k_len - half)).tolist()
            for j in range(half):
                a[dst[j]], b[dst[j]] = -a[j], b[j]
            a[int(rng.integers(0, k_len))] = sa.normal(-12, -6)
            c = 0.0 if rng.integers(0, 2) else sc.normal(-14, -8)
        elif kind == "exponent spread":
            # products spanning the input range: tiny ones, and one or two of the largest
            a = [sa.low() for _ in range(k_len)]
            for _ in range(int(rng.integers(1, 3))):
                a[int(rng.integers(0, k_len))] = sa.high()
            b = [sb.normal(-1, 1) for _ in range(k_len)]
        elif kind == "subnormal":
            for j in range(k_len):
                if rng.integers(0, 2):
                    a[j] = sa.subnormal() or a[j]
                if rng.integers(0, 2):
                    b[j] = sb.subnormal() or b[j]
            sub_c = sc.subnormal()
            c = sub_c if sub_c is not None and rng.integers(0, 2) else 0.0
        else:
            kind = "random"
        cases.append((kind, a, b, c))
    return cases


def _default_k(unit: Any) -> int:
    if unit.promotion_interval:
        return 2 * unit.promotion_interval
    return min(max(2 * unit.block_size, 16), DEFAULT_K_CAP)


def unit_vectors(unit: Any, n: int = 100, k_len: int | None = None, seed: int = 0) -> Vectors:
    """Dot-product vectors of a matrix unit: ``d = sum_i a_i*b_i + c`` for K-element a, b.

    Args:
        unit: a :class:`precisim.emulation.MatrixUnit` or a preset name (``"h100-e4m3"``).
        n: number of drawn vectors (random, cancellation, exponent spread, subnormal in turn),
            added to the fixed adversarial ones (zeros, specials, overflow, exact ties at the
            accumulator rounding and just above them).
        k_len: K, the dot length; default 2 x block_size (at least 16, at most 64 for units
            with one huge block), or 2 x promotion_interval for units that promote.
        seed: seed of the drawn vectors.

    Each row: ``case``; ``a`` and ``b``: K space-separated hex codes of the a / b format
    (element 0 first); ``c``: the hex code of the addend in the accumulator format (the
    promotion format for promoting units); ``expected``: the hex code of the result in the
    output format; ``expected_value``: its value. Expected results come from the exact
    reference :func:`precisim.emulation.reference.dot`.
    """
    from precisim.emulation import get_unit, unit_to_dict
    from precisim.emulation.reference import dot

    u = get_unit(unit)
    if u.acc_rounding is Rounding.STOCHASTIC:
        raise ValueError(f"unit {u.name!r} rounds stochastically: conformance vectors need "
                         "a deterministic unit")
    for what, v in (("n", n), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what}={v!r} is not valid: accepted an integer >= 0")
    if k_len is None:
        k_len = _default_k(u)
    if isinstance(k_len, bool) or not isinstance(k_len, int) or not 1 <= k_len <= 1 << 16:
        raise ValueError(f"k_len={k_len!r} is not valid: accepted an integer in 1..65536")
    c_fmt = u.promotion_format if u.promotion_interval else u.acc_format
    out_fmt = u.out_format
    rng = np.random.default_rng(seed)
    rows = []
    skipped = 0
    for case, a, b, c in _unit_cases(u, k_len, n, rng):
        d = dot(a, b, u, c)
        if math.isnan(d) and not out_fmt.has_nan:
            skipped += 1
            continue
        rows.append({
            "case": case,
            "a": " ".join(_hex(_encode(u.a_format, x), u.a_format.bits) for x in a),
            "b": " ".join(_hex(_encode(u.b_format, x), u.b_format.bits) for x in b),
            "c": _hex(_encode(c_fmt, c), c_fmt.bits),
            "expected": _hex(_encode(out_fmt, d), out_fmt.bits),
            "expected_value": d,
        })
    meta = {
        "kind": "unit",
        "unit": u.name,
        "summary": u.summary(),
        "description": u.description,
        "parameters": unit_to_dict(u),
        "k": k_len,
        "a_format": u.a_format.name,
        "b_format": u.b_format.name,
        "c_format": c_fmt.name,
        "out_format": out_fmt.name,
        "n": n,
        "seed": seed,
        "skipped_no_code": skipped,
        "encoding": "a, b: K space-separated hex codes of a_format / b_format, element 0 "
                    "first; c: hex code of c_format; expected: hex code of out_format",
        "reference": "precisim.emulation.reference.dot (exact Fraction arithmetic)",
    }
    return Vectors(rows, meta)


# ---------------------------------------------------------------------------------------------
# output

def _json_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()}
            for r in rows]


def rows_sha256(rows: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (hex) of the rows as written to JSON: ``json.dumps(rows, sort_keys=True,
    separators=(",", ":"))`` in UTF-8, non-finite floats as the strings nan / inf / -inf."""
    canon = json.dumps(_json_rows(rows), sort_keys=True, separators=(",", ":"),
                       allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def write_vectors(rows: Sequence[Mapping[str, Any]], path: str | Path, *,
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write vector rows to ``.csv`` (one row per vector) or ``.json`` (``{"header", "rows"}``).

    The JSON header holds ``meta`` (default: the ``meta`` of a :class:`Vectors`), the precisim
    version, the row count and :func:`rows_sha256`; floats NaN / +-inf are written as the
    strings ``nan`` / ``inf`` / ``-inf`` (strict JSON). The file is written atomically.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"cannot write vectors to {str(path)!r}: accepted suffixes .csv, .json")
    if not rows:
        raise ValueError("no vector rows to write")
    if suffix == ".json":
        header = {**(getattr(rows, "meta", {}) if meta is None else meta),
                  "precisim_version": _version(), "rows": len(rows),
                  "sha256": rows_sha256(rows)}
        text = json.dumps({"header": header, "rows": _json_rows(rows)}, indent=1,
                          allow_nan=False) + "\n"
        return write_atomic(path, text)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# command line

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``precisim vectors``."""
    p = sub.add_parser(
        "vectors", help="conformance vectors (inputs + expected output bits) for RTL tests",
        description="Write conformance vectors for a number format (float32 -> format "
        "conversion) or a matrix unit (dot products), with expected bits from the exact "
        "reference. CSV goes to stdout without --out.")
    p.add_argument("format", nargs="?", help="a number format (e.g. e4m3, e2m1, bf16, int8)")
    p.add_argument("--unit", help="a matrix unit preset instead of a format (e.g. h100-e4m3)")
    p.add_argument("--rounding", default="rne", help="format rounding (default rne)")
    p.add_argument("--overflow", default=None,
                   help="format overflow: saturate, inf, nan, wrap (default: inf if the format "
                   "has one, else saturate)")
    p.add_argument("--n", type=int, default=None,
                   help="random vectors (default 1000 for a format, 100 for a unit)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--k", type=int, default=None, help="unit dot length K (default from the "
                   "unit's block size)")
    p.add_argument("--all-codes", action="store_true",
                   help="every code of a wide format (default only formats of <= 8 bits)")
    p.add_argument("--out", help="output file, .csv or .json (default: CSV on stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``precisim vectors``: exit status 0, or 2 with a message on bad input."""
    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if (args.format is None) == (args.unit is None):
        return fail("give either a FORMAT or --unit NAME (exactly one)")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        return fail(f"--out {args.out!r}: accepted suffixes .csv, .json")
    try:
        if args.unit is not None:
            rows = unit_vectors(args.unit, n=100 if args.n is None else args.n, k_len=args.k,
                                seed=args.seed)
        else:
            rows = format_vectors(args.format, args.rounding, args.overflow,
                                  n_random=1000 if args.n is None else args.n, seed=args.seed,
                                  all_codes=True if args.all_codes else None)
    except KeyError as exc:
        return fail(str(exc.args[0]) if exc.args else str(exc))
    except (FormatError, ValueError) as exc:
        return fail(str(exc))
    if args.out:
        path = write_vectors(rows, args.out)
        what = rows.meta.get("unit") or rows.meta.get("format")
        print(f"wrote {len(rows)} vectors for {what} to {path} (sha256 {rows_sha256(rows)})")
        return 0
    try:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
