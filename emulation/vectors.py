"""Matrix-unit conformance vectors: dot products ``d = sum_i a_i*b_i + c`` and the bits a matrix
unit must return, for a hardware team to run against its RTL.

:func:`unit_vectors` computes the expected bits with the slow exact reference
:func:`precisim.emulation.reference.dot` (Python ``Fraction`` arithmetic), never with the fast
matmul it is tested against, on adversarial cases (cancellation, wide exponent spread, exact
ties at the accumulator's rounding, subnormals, overflow and special values) and random ones.
Rows, codes and files are those of the format vectors (:mod:`precisim.formats.vectors`:
:class:`~precisim.formats.vectors.Vectors`, ``write_vectors``). On the command line::

    precisim vectors --unit h100-e4m3 --n 200 --out h100_e4m3.csv
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
from precisim.formats import FloatFormat, IntFormat, Rounding
from precisim.formats.vectors import Vectors, hex_code, value_code

from .presets import get_unit, unit_to_dict
from .reference import dot

__all__ = ["DEFAULT_K_CAP", "unit_vectors"]

#: the default dot length of units whose one block is huge (exact accumulators)
DEFAULT_K_CAP = 64


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


#: the most products (vectors x K) one :func:`unit_vectors` call computes
MAX_PRODUCTS = 1 << 24


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
    if n * k_len > MAX_PRODUCTS:
        raise ValueError(f"n={n} vectors of k_len={k_len} are {n * k_len:,} products: accepted "
                         f"at most {MAX_PRODUCTS:,} per call (each is computed exactly; split "
                         "larger sets by seed)")
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
            "a": " ".join(hex_code(value_code(u.a_format, x), u.a_format.bits) for x in a),
            "b": " ".join(hex_code(value_code(u.b_format, x), u.b_format.bits) for x in b),
            "c": hex_code(value_code(c_fmt, c), c_fmt.bits),
            "expected": hex_code(value_code(out_fmt, d), out_fmt.bits),
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
