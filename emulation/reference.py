"""Exact reference dot products under a :class:`MatrixUnit`: slow and obviously correct.

One output at a time, in Python ``Fraction`` arithmetic, following the numbered semantics of
:mod:`precisim.emulation.matrix_unit` (docs/arithmetic.md section 4; Khattak & Mikaitis, arXiv
2512.07004) step by step. Rounding to formats uses the exact reference of
:mod:`precisim.formats.reference`. The fast vectorised :func:`precisim.emulation.matmul` is
tested against this module bit for bit; it shares no arithmetic code with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding, get_format
from precisim.formats.descriptor import floor_log2
from precisim.formats.reference import round_to_int_format
from precisim.formats.rounding import ExactRemainder, round_up

from .matrix_unit import Alignment, CMode, Drop, MatrixUnit

Value = Fraction | float  # float only for nan, +-inf and -0.0
FP32_FMT = get_format("fp32")

__all__ = ["dot", "exact_dot", "exponent_of", "scaled_dot"]


def round_to_float(v: Fraction, fmt: FloatFormat, rounding: Rounding, overflow: Overflow, *,
                   flush_output: bool = False, sr_rand: int | None = None,
                   sr_bits: int = 24) -> Value:
    """Round an exact value to ``fmt`` (signed formats; the result keeps v's sign)."""
    negative = v < 0
    ax = abs(v)
    if ax == 0:
        return Fraction(0)
    e = max(floor_log2(ax), fmt.emin)
    ulp = Fraction(2) ** (e - fmt.man_bits)
    k = ax / ulp
    lo = math.floor(k)
    up = int(bool(round_up(rounding, ExactRemainder(lo, k - lo, negative, sr_rand, sr_bits))))
    r = (lo + up) * ulp
    if r > fmt.max:
        if overflow is Overflow.SATURATE:
            r = fmt.max
        elif overflow is Overflow.NAN:
            return math.nan
        else:
            return -math.inf if negative else math.inf
    if flush_output and r < fmt.min_normal:
        r = Fraction(0)
    if r == 0:
        return -0.0 if negative else Fraction(0)
    return -r if negative else r


def _emin(fmt: FloatFormat | IntFormat) -> int:
    return fmt.emin if isinstance(fmt, FloatFormat) else -fmt.frac_bits


def exponent_of(x: Fraction, fmt: FloatFormat | IntFormat) -> int:
    """e_x = max(floor(log2|x|), emin of x's format) for a nonzero x (docs/arithmetic.md 4.2)."""
    return max(floor_log2(abs(x)), _emin(fmt))


def _is_special(v: Value) -> bool:
    return isinstance(v, float) and (math.isnan(v) or math.isinf(v))


def _value(x: float, fmt: FloatFormat | IntFormat, flush: bool, what: str) -> Value:
    """Exact value of an input element, checked to be a value of ``fmt``."""
    x = float(x)
    if math.isnan(x):
        return x
    if math.isinf(x):
        if not fmt.has_inf:
            raise ValueError(f"{what}={x} is not a value of {fmt.name} (it has no infinity)")
        return x
    if x == 0:
        return -0.0 if math.copysign(1.0, x) < 0 else Fraction(0)
    v = Fraction(x)
    if isinstance(fmt, FloatFormat):
        r = round_to_float(v, fmt, Rounding.NEAREST_EVEN, Overflow.SATURATE)
    else:
        r = round_to_int_format(v, fmt)
    if r != v:
        raise ValueError(f"{what}={x!r} is not a value of {fmt.name}")
    if flush and isinstance(fmt, FloatFormat) and abs(v) < fmt.min_normal:
        return -0.0 if v < 0 else Fraction(0)
    return v


def _mul(x: Value, y: Value) -> Value:
    if _is_special(x) or _is_special(y):
        return float(x) * float(y)
    if isinstance(x, float) or isinstance(y, float):  # a -0.0 operand
        neg = (math.copysign(1.0, float(x)) < 0) != (math.copysign(1.0, float(y)) < 0)
        return -0.0 if neg else Fraction(0)
    p = x * y
    return -0.0 if p == 0 and (x < 0) != (y < 0) else p


def _is_neg_zero(v: Value) -> bool:
    return isinstance(v, float) and v == 0 and math.copysign(1.0, v) < 0


def _exact(v: Value) -> Fraction:
    return Fraction(0) if isinstance(v, float) else v


def _round(v: Value, fmt: FloatFormat | IntFormat, unit: MatrixUnit, which: str,
           rand: int | None = None) -> Value:
    """Round an exact value (or -0.0 / inf) to ``fmt`` under one of the unit's roundings."""
    if _is_special(v):
        return v
    rounding, overflow, sr_bits = {
        "acc": (unit.acc_rounding, unit.acc_overflow, unit.acc_sr_bits or 24),
        "product": (unit.product_rounding, Overflow.SATURATE, 24),
        "promotion": (unit.promotion_rounding, Overflow.INF, 24),
        "output": (unit.output_rounding, unit.output_overflow, 24),
    }[which]
    if isinstance(fmt, IntFormat):
        if _is_neg_zero(v):
            return Fraction(0)
        return round_to_int_format(v, fmt, rounding, overflow, sr_rand=rand, sr_bits=sr_bits)
    flush = unit.flush_output_subnormals and which in ("acc", "output")
    if _is_neg_zero(v):
        return v
    return round_to_float(v, fmt, rounding, overflow, flush_output=flush, sr_rand=rand,
                          sr_bits=sr_bits)


def _align(v: Fraction, quantum: Fraction, drop: Drop) -> Fraction:
    """The term v kept on the grid of ``quantum`` (bits below it dropped as ``drop`` says)."""
    t = v / quantum
    if t.denominator == 1:
        return v
    if drop is Drop.TRUNCATE:
        q = Fraction(math.floor(abs(t))) * (1 if t > 0 else -1)
    elif drop is Drop.FLOOR:
        q = Fraction(math.floor(t))
    elif drop is Drop.NEAREST:
        q = Fraction(round(t))  # Python's round on a Fraction: ties to even
    else:  # STICKY
        q = (math.floor(abs(t)) + Fraction(1, 2)) * (1 if t > 0 else -1)
    return q * quantum


def _block(products: list[tuple[Value, int]], c: Value, unit: MatrixUnit,
           rand: int | None) -> Value:
    """One block FMA: ``products`` = [(exact product, its alignment exponent)], c the incoming
    accumulator (finite). Returns the block result in the (block) accumulator format."""
    acc = unit.acc_format
    terms = [(p, e) for p, e in products if not isinstance(p, float) and p != 0]
    all_neg_zero = all(_is_neg_zero(p) for p, _ in products) and _is_neg_zero(c)
    cval = _exact(c)
    joint = unit.c_mode is CMode.JOINT
    if joint and cval != 0:
        terms.append((cval, exponent_of(cval, acc)))
    if unit.alignment_bits is None or not terms:
        s = sum((t for t, _ in terms), Fraction(0))
    else:
        E = max(e for _, e in terms)
        if unit.alignment_floor is not None:
            E = max(E, unit.alignment_floor)
        quantum = Fraction(2) ** (E - unit.alignment_bits)
        s = sum((_align(t, quantum, unit.drop) for t, _ in terms), Fraction(0))
    if not joint:
        s += cval
    if s == 0:
        return -0.0 if all_neg_zero else Fraction(0)
    return _round(s, unit.block_format, unit, "acc", rand)


def _specials(values: list[Value]) -> Value | None:
    """NaN / inf result of the model assumption of docs/arithmetic.md section 4, or None."""
    nan = any(isinstance(v, float) and math.isnan(v) for v in values)
    pos = any(v == math.inf for v in values if isinstance(v, float))
    neg = any(v == -math.inf for v in values if isinstance(v, float))
    if nan or (pos and neg):
        return math.nan
    if pos:
        return math.inf
    if neg:
        return -math.inf
    return None


def _to_float(v: Value) -> float:
    return v if isinstance(v, float) else float(v)


def _check_scales(s: Sequence[float], k: int, what: str) -> list[Value]:
    if len(s) != k:
        raise ValueError(f"{what} has {len(s)} scales for {k} elements; they must match")
    out: list[Value] = []
    for x in s:
        x = float(x)
        if math.isnan(x):
            out.append(math.nan)
        elif math.isinf(x) or x < 0:
            raise ValueError(f"{what}: scale {x!r} is not valid: accepted finite scales >= 0 "
                             "(or NaN for a NaN block)")
        else:
            out.append(Fraction(x))
    return out


def _scale_product(x: Value, y: Value, exact: bool) -> Value:
    """s = s_a*s_b: exact (E8M0 pairs), else rounded to fp32 with RNE (float scales)."""
    if _is_special(x) or _is_special(y):
        return math.nan
    s = _exact(x) * _exact(y)
    if exact or s == 0:
        return s
    return _exact(round_to_float(s, FP32_FMT, Rounding.NEAREST_EVEN, Overflow.INF))


def dot(a: Sequence[float], b: Sequence[float], unit: MatrixUnit, c: float = 0.0, *,
        rand: Sequence[int] | None = None, scale: float = 1.0) -> float:
    """``d = sum_i a_i*b_i + c`` computed exactly as ``unit`` does; returns the float value.

    Args:
        a, b: the K elements of one row of A and one column of B (values of the unit's input
            formats; any other value raises ``ValueError``).
        c: the incoming accumulator (a value of the accumulator format, or of the promotion
            format when the unit promotes).
        rand: for ``acc_rounding="sr"``: one random integer in [0, 2^acc_sr_bits) per block
            rounding, in order (block j of the whole K).
        scale: s_a*s_b applied to each partial sum at promotion (units with promotion only).
    """
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} elements and b has {len(b)}; they must match")
    ff = unit.flush_input_subnormals
    av = [_value(x, unit.a_format, ff, "a") for x in a]
    bv = [_value(x, unit.b_format, ff, "b") for x in b]
    c_fmt = unit.promotion_format if unit.promotion_interval else unit.acc_format
    cv = _value(c, c_fmt, False, "c")
    chunk = None if unit.promotion_interval is None else (lambda i: Fraction(scale))
    return _dot(av, bv, cv, unit, rand, None, chunk, None)


def scaled_dot(a: Sequence[float], b: Sequence[float], unit: MatrixUnit, sa: Sequence[float],
               sb: Sequence[float], *, exact_scale_product: bool = False,
               epilogue: tuple[float, float, float, float] | None = None,
               rand: Sequence[int] | None = None) -> float:
    """One output of a block-scaled GEMM under ``unit``, exactly (docs/arithmetic.md sections 2, 4).

    ``a``, ``b``: the K element values (values of the unit's input formats); ``sa``, ``sb``:
    the scale of the K-block each element belongs to (one per element; NaN marks a NaN
    block, which makes the result NaN). The scale product of element i is
    ``s_i = sa_i*sb_i``, exact when ``exact_scale_product`` (E8M0 pairs: the exponents add),
    else rounded once to fp32 with RNE (float scales, as DeepGEMM / cuBLAS form it).

    * Unit with promotion (DeepSeek-V3 / DeepGEMM): ``s_i`` must be constant over each
      promotion chunk; the chunk's products are summed unscaled by the unit's block chain and
      the chunk's partial sum is promoted as ``acc = round(acc + s*partial)`` (one rounding).
    * Unit without promotion: the term of product i is ``s_i*a_i*b_i``, formed exactly
      (rounded to ``product_format`` if the unit rounds products); its alignment exponent is
      ``e_a + e_b + floor(log2 s_i)`` (unnormalised alignment: significand in [1, 8)), the
      exponent of the rounded product (product format), or floor(log2|term|) (normalised).
      The terms then go through the unit's alignment, block sums and roundings unchanged.
    * ``epilogue = (p_a, p_b, g_a, g_b)``: whole-K scales applied once to the final
      accumulator: ``alpha = fl32(fl32(p_a*p_b) / fl32(g_a*g_b))`` and the result is
      ``fl32(alpha*acc)`` (fp32 RNE; before the unit's output rounding, if any).
    """
    k = len(a)
    if len(b) != k:
        raise ValueError(f"a has {k} elements and b has {len(b)}; they must match")
    ff = unit.flush_input_subnormals
    av = [_value(x, unit.a_format, ff, "a") for x in a]
    bv = [_value(x, unit.b_format, ff, "b") for x in b]
    s = [_scale_product(x, y, exact_scale_product) for x, y in
         zip(_check_scales(sa, k, "sa"), _check_scales(sb, k, "sb"), strict=True)]
    alpha = None
    if epilogue is not None:
        pa, pb, ga, gb = (Fraction(float(v)) for v in epilogue)
        p = round_to_float(pa * pb, FP32_FMT, Rounding.NEAREST_EVEN, Overflow.INF)
        g = round_to_float(ga * gb, FP32_FMT, Rounding.NEAREST_EVEN, Overflow.INF)
        if _is_special(p) or _is_special(g) or _exact(g) == 0:
            raise ValueError(f"epilogue {epilogue!r} gives no finite alpha")
        alpha = _exact(round_to_float(_exact(p) / _exact(g), FP32_FMT,
                                      Rounding.NEAREST_EVEN, Overflow.INF))
    if unit.promotion_interval is None:
        return _dot(av, bv, Fraction(0), unit, rand, s, None, alpha)
    n = unit.promotion_interval
    for i in range(0, k, n):
        chunk = s[i:i + n]
        if any(_is_special(x) for x in chunk):
            continue
        if len(set(chunk)) > 1:
            raise ValueError(f"scales vary inside promotion chunk {i // n} (products {i}.."
                             f"{min(k, i + n) - 1}); they must be constant over each chunk "
                             f"of {n} products")
    if any(_is_special(x) for x in s):
        return _round_out(math.nan, unit)
    return _dot(av, bv, Fraction(0), unit, rand, None, lambda i: s[i * n], alpha)


def _dot(av: list[Value], bv: list[Value], cv: Value, unit: MatrixUnit,
         rand: Sequence[int] | None, term_scales: list[Value] | None,
         chunk_scale, alpha: Fraction | None) -> float:
    """The unit's dot product on checked values (see :func:`dot` and :func:`scaled_dot`)."""
    pf = unit.product_format
    if term_scales is None:
        raw = [_mul(x, y) for x, y in zip(av, bv, strict=True)]
    else:
        raw = [_mul(_mul(x, y), s) if not _is_special(s) else math.nan
               for x, y, s in zip(av, bv, term_scales, strict=True)]
    prods = raw if pf is None else [_round(p, pf, unit, "product") for p in raw]
    special = _specials([*prods, cv])
    if special is not None:
        return _round_out(_epilogue(special, alpha), unit)
    terms: list[tuple[Value, int]] = []
    for i, (x, y, p) in enumerate(zip(av, bv, prods, strict=True)):
        if isinstance(p, float) or p == 0:
            terms.append((p, 0))
        elif pf is not None:
            terms.append((p, exponent_of(p, pf)))
        elif unit.alignment is Alignment.UNNORMALISED:
            e = exponent_of(x, unit.a_format) + exponent_of(y, unit.b_format)
            if term_scales is not None:
                e += floor_log2(_exact(term_scales[i]))
            terms.append((p, e))
        else:
            terms.append((p, floor_log2(abs(p))))
    k = unit.block_size
    blocks = [terms[i:i + k] for i in range(0, len(terms), k)] or [[]]
    rand_iter = iter(rand) if rand is not None else None

    def chain(blks: list[list[tuple[Value, int]]], c0: Value) -> Value:
        acc: Value = c0
        for blk in blks:
            if _is_special(acc):
                continue  # an overflow to inf stays inf
            r = next(rand_iter) if rand_iter is not None else None
            acc = _block(blk, acc, unit, r)
        return acc

    if unit.promotion_interval is None:
        result = chain(blocks, cv)
    else:
        per = unit.promotion_interval // k
        reg: Value = cv
        for ci, i in enumerate(range(0, len(blocks), per)):
            part = chain(blocks[i:i + per], Fraction(0))
            scale = chunk_scale(ci)
            if _is_special(reg) or _is_special(part):
                reg = _to_float(reg) + _to_float(part) * float(scale)
                continue
            t = _exact(reg) + scale * _exact(part)
            if t == 0:
                reg = -0.0 if _is_neg_zero(reg) and _is_neg_zero(part) else Fraction(0)
            else:
                reg = _round(t, unit.promotion_format, unit, "promotion")
        result = reg
    return _round_out(_epilogue(result, alpha), unit)


def _epilogue(v: Value, alpha: Fraction | None) -> Value:
    """fl32(alpha*v) (fp32 RNE, overflow to inf); the identity without an epilogue."""
    if alpha is None:
        return v
    if _is_special(v):
        return float(v) * float(alpha)
    if _is_neg_zero(v):
        return v
    return round_to_float(alpha * v, FP32_FMT, Rounding.NEAREST_EVEN, Overflow.INF)


def _round_out(v: Value, unit: MatrixUnit) -> float:
    out = unit.out_format
    if math.isnan(_to_float(v)):
        return math.nan
    if _is_special(v) and not out.has_inf:
        v = float(v)
        return _to_float(_round(Fraction(2 ** 1000) * (1 if v > 0 else -1), out, unit, "output"))
    if unit.output_format is None and not unit.flush_output_subnormals:
        return _to_float(v)
    return _to_float(_round(v, out, unit, "output"))


def exact_dot(a: Sequence[float], b: Sequence[float], c: float = 0.0,
              out_format: FloatFormat | str = "fp32", rounding: str = "rne") -> float:
    """The exact ``sum a_i*b_i + c`` rounded once to ``out_format`` (any float inputs)."""
    from precisim.formats import get_format

    fmt = get_format(out_format)
    vals = [float(x) * float(y) for x, y in zip(a, b, strict=True)]
    special = _specials([*(v for v in vals if math.isnan(v) or math.isinf(v)), float(c)])
    if special is not None:
        return special
    s = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b, strict=True)),
            Fraction(float(c)))
    return _to_float(round_to_float(s, fmt, Rounding.parse(rounding), Overflow.INF
                                    if fmt.has_inf else Overflow.SATURATE))
