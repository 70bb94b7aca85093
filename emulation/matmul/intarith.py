"""Exact arithmetic on (sign, integer significand, exponent) triples in int64 tensors.

A value is ``(-1)^neg * q * 2^g`` with ``0 <= q < 2^62``. :func:`round_int` rounds such values
to a format (every rounding mode, through the decision table of
:mod:`precisim.formats.rounding`), :func:`add_two` adds two of them in a 60-bit window,
:func:`decompose` splits float32 values of a format into triples. Used by the int64 block
chain (:mod:`.int_chain`) and by the epilogues of the other kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from precisim.formats import FloatFormat, IntFormat, Overflow, Rounding
from precisim.formats.rounding import BitsRemainder, round_up

__all__ = ["NEG_BIG", "NEG_BIG_32", "RoundSpec", "add_two", "bitlen", "c_exponent", "decompose",
           "emin_of", "pos_parts", "round_int", "shr", "to_float"]

NEG_BIG = -(1 << 40)  # exponent of a zero term: below everything
NEG_BIG_32 = -(1 << 20)  # the same, for int32 exponents
SHIFT_MAX = 62


@dataclass(frozen=True)
class RoundSpec:
    """Everything a rounding to one format needs, as plain ints (the matrix-unit kernels')."""

    is_int: bool
    m: int  # fraction bits (float formats)
    emin: int
    max_sig: int  # largest finite value = max_sig * 2^max_exp
    max_exp: int
    rounding: Rounding
    overflow: Overflow
    flush: bool
    sr_bits: int
    frac_bits: int = 0
    bits: int = 0
    signed: bool = True
    qmin: int = 0
    qmax: int = 0

    @staticmethod
    def of(fmt: FloatFormat | IntFormat, rounding: Rounding, overflow: Overflow,
           flush: bool = False, sr_bits: int | None = None) -> RoundSpec:
        sb = sr_bits or 0
        if isinstance(fmt, IntFormat):
            return RoundSpec(True, 0, 0, 0, 0, rounding, overflow, False, sb, fmt.frac_bits,
                             fmt.bits, fmt.signed, fmt.qmin, fmt.qmax)
        mc = fmt.max_code_magnitude
        e_field, m_field = mc >> fmt.man_bits, mc & ((1 << fmt.man_bits) - 1)
        if e_field == 0 and fmt.subnormals:
            sig, exp = m_field, fmt.emin - fmt.man_bits
        else:
            sig, exp = m_field | (1 << fmt.man_bits), e_field - fmt.bias - fmt.man_bits
        return RoundSpec(False, fmt.man_bits, fmt.emin, sig, exp, rounding, overflow, flush, sb)

    @property
    def max_value(self) -> float:
        """The largest finite magnitude (float formats)."""
        return float(self.max_sig) * 2.0 ** self.max_exp


def bitlen(x: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 values below 2^62 (0 for 0)."""
    ex = (x.to(torch.float64).view(torch.int64) >> 52) - 1022  # x in [2^(ex-1), 2^ex)
    too_big = (x >> (ex - 1).clamp(0, SHIFT_MAX)) == 0
    ex = ex - (too_big & (x > 0)).to(torch.int64)
    return torch.where(x > 0, ex, 0)


def shr(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x >> s for non-negative x < 2^62 and s >= 0 of any size."""
    return torch.where(s > SHIFT_MAX, 0, x >> s.clamp(0, SHIFT_MAX))


def shift_remainder(mag: torch.Tensor, rs: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mag >> rs`` (rs >= 0 of any size) with its remainder and half an ulp of the result,
    as :class:`~precisim.formats.rounding.BitsRemainder` wants them (beyond the word the half
    is 2^62, above every remainder)."""
    q = shr(mag, rs)
    rem = torch.where(rs > SHIFT_MAX, mag, mag - (q << rs.clamp(0, SHIFT_MAX)))
    one = torch.ones((), dtype=mag.dtype, device=mag.device)
    half = torch.where((rs > SHIFT_MAX) | (rs == 0), one << SHIFT_MAX,
                       one << (rs - 1).clamp(0, SHIFT_MAX - 1).to(mag.dtype))
    return q, rem, half


def round_int(neg: torch.Tensor, mag: torch.Tensor, base: torch.Tensor, sp: RoundSpec,
              rand: torch.Tensor | None = None):
    """Round the exact value (-1)^neg * mag * 2^base (mag < 2^62) to the format of ``sp``.

    Returns (neg, q, g, inf, nan): the value (-1)^neg * q * 2^g, plus masks of results that
    overflowed to infinity / NaN.
    """
    if sp.is_int:
        g = torch.full_like(base, -sp.frac_bits)
    else:
        e = base + bitlen(mag) - 1
        g = torch.maximum(e, torch.full_like(e, sp.emin)) - sp.m
    sh = g - base
    right = sh > 0
    shp = sh.clamp(0, 63)
    q, rem, half = shift_remainder(mag, shp)
    q = torch.where(right, q, mag << (-sh).clamp(0, SHIFT_MAX))
    t = None
    if sp.rounding is Rounding.STOCHASTIC:
        d = shp - sp.sr_bits
        t = torch.where(d >= 0, shr(mag, d.clamp(min=0)) & ((1 << sp.sr_bits) - 1),
                        rem << (-d).clamp(0, SHIFT_MAX))
    up = round_up(sp.rounding, BitsRemainder(q, rem, half, neg, t, rand, sp.sr_bits))
    if up is not None:
        q = q + up.to(torch.int64)
    inf = torch.zeros_like(neg)
    nan = torch.zeros_like(neg)
    if sp.is_int:
        code = torch.where(neg, -q, q)
        if sp.overflow is Overflow.WRAP:
            code = code & ((1 << sp.bits) - 1)
            if sp.signed:
                code = torch.where(code >= (1 << (sp.bits - 1)), code - (1 << sp.bits), code)
        code = code.clamp(sp.qmin, sp.qmax)
        return code < 0, code.abs(), g, inf, nan
    ovf = ((g > sp.max_exp) | ((g == sp.max_exp) & (q > sp.max_sig))) & (q > 0)
    if sp.overflow is Overflow.SATURATE:
        q = torch.where(ovf, sp.max_sig, q)
        g = torch.where(ovf, sp.max_exp, g)
    elif sp.overflow is Overflow.NAN:
        nan = ovf
    else:
        inf = ovf
    if sp.flush:
        q = torch.where(q < (1 << sp.m), 0, q)
    return neg, q, g, inf, nan


def add_two(n1, m1, g1, n2, m2, g2):
    """(-1)^n1 m1 2^g1 + (-1)^n2 m2 2^g2 in a 60-bit window with a sticky bit.

    Exact when both fit in the window; otherwise the smaller operand is truncated with a
    sticky bit at the bottom of the window, which keeps every later rounding to a precision of
    up to 30 bits correct (the window keeps >= 28 bits below such a rounding point).
    """
    t1 = torch.where(m1 > 0, g1 + bitlen(m1), NEG_BIG)
    t2 = torch.where(m2 > 0, g2 + bitlen(m2), NEG_BIG)
    top = torch.maximum(t1, t2)
    far = 1 << 40
    low = torch.minimum(torch.where(m1 > 0, g1, far), torch.where(m2 > 0, g2, far))
    base = torch.where(top == NEG_BIG, 0, torch.maximum(low, top - 60))  # 0 + 0: base 0

    def put(n, m, g):
        s = g - base
        left = m << s.clamp(0, SHIFT_MAX)
        right = shr(m, (-s).clamp(min=0))
        lost = (right << (-s).clamp(0, SHIFT_MAX)) != m
        v = torch.where(s >= 0, left, right | (lost & (s < 0)).to(torch.int64))
        return torch.where(n, -v, v)

    s = put(n1, m1, g1) + put(n2, m2, g2)
    return s < 0, s.abs(), base


def emin_of(fmt: FloatFormat | IntFormat) -> int:
    """Exponent of the smallest normal (integer formats: of the grid step)."""
    return fmt.emin if isinstance(fmt, FloatFormat) else -fmt.frac_bits


def decompose(x: torch.Tensor, fmt: FloatFormat | IntFormat,
              sig_fmt: FloatFormat | IntFormat | None = None):
    """Finite float32 values of ``fmt`` -> (neg, significand, lsb exponent g, alignment e).

    |x| = sig * 2^g; e = max(floor(log2|x|), emin(fmt)) (NEG_BIG for zeros). ``sig_fmt``: a
    format every x is a value of whose grid gives sig and g (default ``fmt``): block-scaled
    elements use their element format, which keeps the significands short.
    """
    neg = torch.signbit(x)
    ax = x.abs().to(torch.float64)
    _, ex = torch.frexp(ax)
    fl = ex.to(torch.int64) - 1
    e = torch.maximum(fl, torch.full_like(fl, emin_of(fmt)))
    sf = fmt if sig_fmt is None else sig_fmt
    if isinstance(sf, IntFormat):
        g = torch.full_like(fl, -sf.frac_bits)
    else:
        g = torch.maximum(fl, torch.full_like(fl, sf.emin)) - sf.man_bits
    sig = torch.ldexp(ax, (-g).to(torch.float64)).to(torch.int64)
    zero = ax == 0
    e = torch.where(zero, NEG_BIG, e)
    return neg, sig, g, e


def align_exponents(x: torch.Tensor, fmt: FloatFormat | IntFormat, zero: int) -> torch.Tensor:
    """Alignment exponents max(floor(log2|x|), emin) of finite values of ``fmt`` (``zero`` for
    zeros), as ``decompose(x, fmt)[3]`` clamped at ``zero`` gives them: from the float32 bits
    when the format's exponents lie in float32's (a float32 subnormal then has exponent field
    0 and alignment exponent emin = -126), else through :func:`decompose`."""
    if x.dtype != torch.float32 or not isinstance(fmt, FloatFormat) or fmt.emin < -126:
        return decompose(x, fmt)[3].clamp(min=zero)
    e = ((x.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.where(x == 0, zero, e.clamp(min=fmt.emin))


def c_exponent(q: torch.Tensor, g: torch.Tensor, fmt: FloatFormat | IntFormat) -> torch.Tensor:
    """Alignment exponent of accumulator values q * 2^g of ``fmt`` (NEG_BIG for 0)."""
    e = g + bitlen(q) - 1
    return torch.where(q > 0, torch.maximum(e, torch.full_like(e, emin_of(fmt))), NEG_BIG)


def to_float(neg, q, g) -> torch.Tensor:
    """float32 of (-1)^neg * q * 2^g (exact for values of a float32-representable format)."""
    v = torch.ldexp(q.to(torch.float64), g.to(torch.float64)).to(torch.float32)
    return torch.where(neg, -v, v)


def pos_parts(s: torch.Tensor):
    """(sig, g, e) of float64 values s >= 0 with at most 24 significant bits: s = sig*2^g,
    e = floor(log2 s) (NEG_BIG for 0)."""
    mant, ex = torch.frexp(s)
    sig = torch.ldexp(mant, torch.full_like(mant, 24.0)).to(torch.int64)
    ex = ex.to(torch.int64)
    return sig, ex - 24, torch.where(s > 0, ex - 1, NEG_BIG)
